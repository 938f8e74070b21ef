"""`bridge explain`: a dry run of the rules stage for one event. Shows which rules match, why the
others do not (their first failing condition), and what each target would receive. Sends nothing.
"""

from __future__ import annotations

from typing import Any

from bridge.config import (
    AmqpTargetConfig,
    BrokerTargetCommon,
    Config,
    MqttTargetConfig,
    NatsTargetConfig,
    RedisTargetConfig,
    WebhookTargetConfig,
)
from bridge.errors import BridgeError
from bridge.models import EVENT_TYPES, Event
from bridge.rules import Router
from bridge.suggest import EVENT_MEANINGS, suggest


class EventError(BridgeError, ValueError):
    """The file given to `bridge explain` is not an event this bridge understands (bad usage)."""


def parse_event(body: Any) -> Event:
    """A CloudEvents event as the webhook body carries it. Raises EventError (a user message)."""
    if not isinstance(body, dict):
        raise EventError("the event must be a JSON object (a CloudEvents event)")
    if not isinstance(body.get("type"), str) or not body["type"]:
        if "status" in body and "id" in body:
            raise EventError(
                "this looks like a bare task; wrap it as a CloudEvents event: "
                '{"type": "task.succeeded", "source": "bridge/mj", "subject": "<task id>", '
                '"data": {"task": {...}}}'
            )
        raise EventError("the event has no 'type' (expected a CloudEvents event)")
    if body["type"] not in EVENT_TYPES:
        # No rule could ever see it (and `on: "*"` would seem to match it here): refuse.
        hint = (
            suggest(body["type"], EVENT_TYPES, EVENT_MEANINGS)
            or f" (known: {', '.join(EVENT_TYPES)})"
        )
        raise EventError(f"'{body['type']}' is not a known event type{hint}")
    if body.get("data") is not None and not isinstance(body["data"], dict):
        raise EventError("the event's 'data' must be an object")
    try:
        return Event.from_cloudevent(body)
    except (TypeError, ValueError, AttributeError) as exc:
        raise EventError(f"not a CloudEvents event this bridge understands: {exc}") from exc


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines()) or prefix


def explain(config: Config, body: dict[str, Any]) -> str:
    """The report `bridge explain` prints."""
    event = parse_event(body)
    lines = [f"event {event.type} {event.subject or '-'} from {event.source or '-'} ({event.id})"]
    matches = Router(config).explain(event)
    if not matches:
        lines.append("no rules in the config")
    targets = 0
    for match in matches:
        lines.append("")
        if not match.matched:
            lines.append(f"rule {match.rule}: no match: {match.reason}")
            continue
        lines.append(f"rule {match.rule}: matches")
        lines += [f"  note: {note}" for note in match.notes]
        for delivery in match.deliveries:
            targets += 1
            lines.append(f"  -> {delivery.target}")
            target = config.targets.get(delivery.target)
            if isinstance(target, WebhookTargetConfig):
                # The router renders no text for a webhook: it POSTs the event as it is.
                signed = "signed, " if target.secret else ""
                if delivery.group is None:
                    how, what = "as JSON", f"webhook-id {event.id}"
                else:
                    how, what = "in the digest's JSON array", f"id {event.id}"
                lines.append(
                    f"     receives the CloudEvent itself {how} (type {event.type}, {what}; "
                    f"{signed}no title or body)"
                )
                continue
            if isinstance(target, BrokerTargetCommon):
                lines.append(
                    f"     receives the CloudEvent itself (id {event.id}) {_where(target, event)}"
                )
                continue
            lines.append(f"     title: {delivery.title}")
            lines.append("     body:")
            lines.append(_indent(delivery.body, "       "))
    lines.append("")
    lines.append(f"{targets} target(s) would be notified; nothing was sent.")
    return "\n".join(lines)


def _where(target: BrokerTargetCommon, event: Event) -> str:
    """Where a broker target would put the event: its subject, key or topic, rendered."""
    from bridge.topics import Namer

    match target:
        case NatsTargetConfig():
            return f"on subject {Namer(target.subject, 'nats')(event)}, no title or body"
        case AmqpTargetConfig():
            key = Namer(target.routing_key, "amqp")(event)
            return f"on exchange {target.exchange!r}, routing key {key}, no title or body"
        case RedisTargetConfig():
            return f"in stream {Namer(target.stream, 'redis')(event)}, no title or body"
        case MqttTargetConfig():
            return f"on topic {Namer(target.topic_template, 'mqtt')(event)}, no title or body"
    return "no title or body"

"""Targets stage, pure: where a broker target puts an event. NATS subjects, AMQP routing keys,
Redis stream keys and MQTT topics are Jinja templates (the rules' sandbox) rendered per event, then
made safe for the broker: a task id with a space or a wildcard in it never widens a subscription.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from jinja2 import Template, meta

from bridge import templates
from bridge.models import Event
from bridge.sandbox import TemplateLimit

Kind = Literal["nats", "amqp", "redis", "mqtt"]

# What each broker calls the name, for messages.
NOUN: dict[Kind, str] = {
    "nats": "NATS subject",
    "amqp": "AMQP routing key",
    "redis": "Redis stream key",
    "mqtt": "MQTT topic",
}
AMQP_KEY_BYTES = 255  # a shortstr
MQTT_TOPIC_BYTES = 65535

# NATS: tokens are separated by dots; whitespace, the wildcards * and > and control characters are
# not allowed in a subject one publishes to. MQTT: + and # are wildcards, NUL is forbidden.
_NATS_BAD = re.compile(r"[\s*>\x00-\x1f\x7f]")
_MQTT_BAD = re.compile(r"[+#\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def context(event: Event) -> dict[str, Any]:
    """The rules' template context, plus the event's own fields at the top level, so a subject
    reads `mj.{{ source }}.{{ type }}` (the same as `mj.{{ event.source }}.{{ event.type }}`)."""
    ctx = templates.context(event)
    ctx.update(id=event.id, type=event.type, source=event.source, subject=event.subject)
    return ctx


def clean(name: str, kind: Kind) -> str:
    """`name` made publishable on `kind`: forbidden characters become `_`; empty NATS tokens
    (`a..b`) become `_`; an AMQP routing key is cut to 255 bytes."""
    match kind:
        case "nats":
            return ".".join(_NATS_BAD.sub("_", token) or "_" for token in name.split("."))
        case "mqtt":
            name = _MQTT_BAD.sub("_", name)
            return name.encode()[:MQTT_TOPIC_BYTES].decode("utf-8", "ignore")
        case "amqp":
            name = _CONTROL.sub("_", name)
            return name.encode()[:AMQP_KEY_BYTES].decode("utf-8", "ignore")
        case "redis":
            return name
    raise ValueError(kind)


def render(template: Template, event: Event, kind: Kind) -> str:
    """The name for `event`. Raises ValueError when it renders empty (no broker takes that)."""
    name = clean(template.render(context(event)).strip(), kind)
    if not name and kind != "amqp":  # the default exchange routes by key; "" is a valid key
        raise ValueError(f"the {NOUN[kind]} template rendered empty for event {event.id}")
    return name


class Namer:
    """`render` for one target's template, remembering the names of templates that use only the
    event's short fields (the defaults use `source` and `type`): a busy target renders each
    (source, type) once instead of once per event."""

    CACHED = frozenset({"source", "type", "subject", "id"})
    LIMIT = 4096

    def __init__(self, source: str, kind: Kind) -> None:
        self.template = templates.compile_template(source)
        self.kind = kind
        used = meta.find_undeclared_variables(templates.ENV.parse(source))
        self._keys = tuple(sorted(used)) if used <= self.CACHED else None
        self._names: dict[tuple[str, ...], str] = {}

    def __call__(self, event: Event) -> str:
        if self._keys is None:
            return render(self.template, event, self.kind)
        key = tuple(getattr(event, k) for k in self._keys)
        name = self._names.get(key)
        if name is None:
            if len(self._names) >= self.LIMIT:
                self._names.clear()
            name = self._names[key] = render(self.template, event, self.kind)
        return name


def sample_event() -> Event:
    """An event with plain values, to see what a template's own text renders to."""
    return Event(
        id="evt_sample",
        type="task.succeeded",
        source="mj",
        subject="1234567890",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        task={"id": "1234567890", "status": "SUCCESS", "action": "IMAGINE", "progress": "100%"},
    )


def problem(source: str, kind: Kind) -> str | None:
    """Why `source` is no usable name template for `kind`, or None. Checks the template compiles,
    and that its own text (rendered for a plain sample event) is a name the broker accepts: a
    literal wildcard or space would otherwise be replaced by `_` at every send."""
    if failure := templates.check_template(source):
        return f"template error: {failure[1]}"
    try:
        rendered = templates.compile_template(source).render(context(sample_event())).strip()
    except TemplateLimit as exc:
        return f"template error: {exc}"
    except Exception as exc:  # a sandbox refusal or a filter choking on the sample
        return f"template error: {type(exc).__name__}"
    if not rendered and kind != "amqp":
        return f"renders an empty {NOUN[kind]}"
    if clean(rendered, kind) != rendered:
        match kind:
            case "nats":
                why = "no spaces, no * or > wildcards, no empty tokens between dots"
            case "mqtt":
                why = "no + or # wildcards"
            case _:
                why = f"at most {AMQP_KEY_BYTES} bytes, no control characters"
        article = "an" if kind in ("amqp", "mqtt") else "a"
        return f"renders {rendered!r}, which is not {article} {NOUN[kind]} to publish to ({why})"
    return None

"""Rules stage: events + rules -> deliveries (`Router`), rendered by templates.py. Pure apart from
what throttles and digest windows remember (memory.py); the clock is passed in (`now`), so tests
control time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge import templates
from bridge.models import Delivery, Event, EventType, delivery_id
from bridge.rules.compiled import CompiledRule
from bridge.rules.memory import Memory

if TYPE_CHECKING:
    from bridge.config import Config


@dataclass(frozen=True, slots=True)
class Match:
    """What one rule made of one event: routing, `bridge explain` and cancels read the same."""

    rule: str
    matched: bool
    reason: str = ""  # why it did not match, or why it was not reached
    deliveries: tuple[Delivery, ...] = ()
    notes: tuple[str, ...] = ()
    throttled: bool = False  # matched, but the rule notified about this task too recently


_CANCELS_KEPT = 1024  # stalls whose routed cancel decision waits for `cancels()`


class Router:
    """Routes events through the rules in order. One delivery per (event, target): when several
    rules send an event to the same target, the first one's text wins. Routing, `explain` and
    `cancels` share one evaluation (`_evaluate`), so they never disagree."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        previous: Router | None = None,
    ) -> None:
        self._rules = [CompiledRule.build(r) for r in config.rules]
        # A webhook or a broker carries the event itself, never a title or body: no text is
        # rendered for it.
        self._textless = frozenset(
            name
            for name, t in config.targets.items()
            if t.kind in ("webhook", "nats", "amqp", "redis", "mqtt")
        )
        self._clock = clock
        self._memory = Memory(config.rules)
        # `cancel: true` rules, and what routing decided for the stalls it saw (for `cancels`).
        self._cancelling = frozenset(r.name for r in config.rules if r.cancel)
        self._cancels: dict[str, list[str]] = {}
        if previous is not None:
            # A reload keeps what the rules that are still there remember.
            self._memory.keep(previous._memory, {rule.name for rule in self._rules})

    def route(self, events: Sequence[Event], now: float | None = None) -> list[Delivery]:
        now = self._clock() if now is None else now
        self._memory.prune(now)
        deliveries: list[Delivery] = []
        for event in events:
            matches = self._evaluate(event, now, record=True)
            for match in matches:
                deliveries += match.deliveries
            if event.type == EventType.STALLED and self._cancelling:
                self._cancels[event.id] = self._cancel_rules(matches)
                while len(self._cancels) > _CANCELS_KEPT:
                    del self._cancels[next(iter(self._cancels))]
        return deliveries

    def explain(self, event: Event, now: float | None = None) -> list[Match]:
        """What every rule makes of `event`, as routing would, without touching the throttle or
        digest memory."""
        return self._evaluate(event, self._clock() if now is None else now, record=False)

    def cancels(self, event: Event) -> list[str]:
        """The `cancel: true` rules that matched `event` when it was routed (`stop` and throttles
        hold); an event not routed here is evaluated as routing would."""
        found = self._cancels.pop(event.id, None)
        if found is not None:
            return found
        if not self._cancelling:
            return []
        return self._cancel_rules(self.explain(event))

    def _cancel_rules(self, matches: Sequence[Match]) -> list[str]:
        return [
            m.rule for m in matches if m.matched and not m.throttled and m.rule in self._cancelling
        ]

    def _evaluate(self, event: Event, now: float, *, record: bool) -> list[Match]:
        """The one evaluation of the rules for one event, in order. `record` remembers what the
        throttles and digest windows must (routing); without it nothing changes (explain)."""
        matches: list[Match] = []
        claimed: dict[str, str] = {}  # target -> the rule whose text it gets
        stopped_by: str | None = None
        for rule in self._rules:
            if stopped_by is not None:
                matches.append(Match(rule.name, False, f"not reached: '{stopped_by}' has stop"))
                continue
            if (why := rule.failure(event)) is not None:
                matches.append(Match(rule.name, False, why))
                continue
            if rule.config.stop:
                stopped_by = rule.name
            notes: list[str] = []
            window = rule.config.throttle
            if window:
                notes.append(
                    "throttle: at most one notification per task every "
                    f"{templates.duration(window)}"
                )
                key = (rule.name, event.source, event.subject)
                if self._memory.throttled(key, now, window, record):
                    notes.append("throttled: this task was notified by this rule too recently")
                    matches.append(Match(rule.name, True, "", (), tuple(notes), throttled=True))
                    continue
            notes += [
                f"{t}: already gets this event from rule '{claimed[t]}'"
                for t in rule.config.to
                if t in claimed
            ]
            targets = [t for t in rule.config.to if t not in claimed]
            claimed.update(dict.fromkeys(targets, rule.name))
            textless = record and self._textless.issuperset(targets)
            title, body, error = ("", "", None) if textless or not targets else rule.render(event)
            if error is not None:
                notes.append(f"{error}; its deliveries become dead letters with the default text")
            group, not_before = (
                self._memory.digest(rule, event, record) if targets else (None, None)
            )
            if group is not None and not_before is not None:
                after = max(0.0, not_before.timestamp() - event.time.timestamp())
                notes.append(
                    f"digest group '{group}': sent together with the group's other events "
                    f"{templates.duration(after)} after this one"
                )
            deliveries = tuple(
                Delivery(
                    delivery_id(event.id, t),
                    t,
                    rule.name,
                    event,
                    title,
                    body,
                    group,
                    not_before,
                    error,
                )
                for t in targets
            )
            matches.append(Match(rule.name, True, "", deliveries, tuple(notes)))
        return matches

"""Rules stage: events + rules -> deliveries (`Router`), rendered by templates.py. Pure apart from
the memory that throttles and digest windows need; the clock is passed in (`now`), so tests
control time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bridge import templates
from bridge.models import Delivery, Event, EventType, delivery_id
from bridge.rules.compiled import CompiledRule

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
        self._throttled: dict[tuple[str, str, str], float] = {}  # (rule, source, subject) -> until
        self._windows: dict[str, float] = {}  # digest group -> when its window closes
        self._window_memory = max(
            [3600.0] + [r.group.interval or 0.0 for r in config.rules if r.group is not None]
        )
        self._next_prune = 0.0
        # `cancel: true` rules, and what routing decided for the stalls it saw (for `cancels`).
        self._cancelling = frozenset(r.name for r in config.rules if r.cancel)
        self._cancels: dict[str, list[str]] = {}
        if previous is not None:
            # A reload keeps what the rules that are still there remember: a throttled task
            # stays throttled and an open digest window stays open across an edit of the file.
            kept = {rule.name for rule in self._rules}
            self._throttled = {k: v for k, v in previous._throttled.items() if k[0] in kept}
            self._windows = {
                k: v for k, v in previous._windows.items() if k.partition("|")[0] in kept
            }

    def route(self, events: Sequence[Event], now: float | None = None) -> list[Delivery]:
        now = self._clock() if now is None else now
        self._prune(now)
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
                if self._throttled.get(key, 0.0) > now:
                    notes.append("throttled: this task was notified by this rule too recently")
                    matches.append(Match(rule.name, True, "", (), tuple(notes), throttled=True))
                    continue
                if record:
                    self._throttled[key] = now + window
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
            group, not_before = self._digest(rule, event, record) if targets else (None, None)
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

    def _digest(
        self, rule: CompiledRule, event: Event, record: bool
    ) -> tuple[str | None, datetime | None]:
        """Alertmanager's grouping for events. The first event of a quiet group opens a window
        of `wait` (group_wait); every event of the group inside the window is due when it
        closes, so all go as one digest. With `interval` (group_interval) the next window closes
        no sooner than `interval` after the last one: at most one message per interval."""
        key = rule.group_key(event)
        group = rule.config.group
        if key is None or group is None:
            return None, None
        at = event.time.timestamp()
        closes = self._windows.get(key)
        if closes is None or at >= closes:
            opens = at + group.wait
            if closes is not None and group.interval:
                opens = max(opens, closes + group.interval)
            closes = opens
            if record:
                self._windows[key] = closes
        return key, datetime.fromtimestamp(closes, UTC)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + 60.0
        self._throttled = {k: v for k, v in self._throttled.items() if v > now}
        # A window is remembered as long as it can still hold the next one back.
        self._windows = {k: v for k, v in self._windows.items() if v > now - self._window_memory}

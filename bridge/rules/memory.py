"""Rules stage: what routing remembers between events, the throttles and the digest windows. Pure:
no clock and no I/O (`now` and the events' times come in); only routing records, `explain` reads.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bridge.models import Event

if TYPE_CHECKING:
    from bridge.config import RuleConfig
    from bridge.rules.compiled import CompiledRule


class Memory:
    """The throttled tasks, (rule, source, subject) -> until, and when each digest group's window
    closes, kept while they can still hold something back (`prune`)."""

    __slots__ = ("_next_prune", "_throttled", "_window_memory", "_windows")

    def __init__(self, rules: Sequence[RuleConfig]) -> None:
        self._throttled: dict[tuple[str, str, str], float] = {}  # (rule, source, subject) -> until
        self._windows: dict[str, float] = {}  # digest group -> when its window closes
        self._window_memory = max(
            [3600.0] + [r.group.interval or 0.0 for r in rules if r.group is not None]
        )
        self._next_prune = 0.0

    def keep(self, previous: Memory, rules: Collection[str]) -> None:
        """Takes over what `previous` remembers of `rules` (a reload: a throttled task stays
        throttled and an open digest window stays open across an edit of the file)."""
        self._throttled = {k: v for k, v in previous._throttled.items() if k[0] in rules}
        self._windows = {k: v for k, v in previous._windows.items() if k.partition("|")[0] in rules}

    def throttled(self, key: tuple[str, str, str], now: float, window: float, record: bool) -> bool:
        """Whether the rule notified about this task too recently; if not and `record`, the
        throttle starts now and lasts `window`."""
        if self._throttled.get(key, 0.0) > now:
            return True
        if record:
            self._throttled[key] = now + window
        return False

    def digest(
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

    def prune(self, now: float) -> None:
        """Forgets what can no longer hold anything back; does the work at most once a minute."""
        if now < self._next_prune:
            return
        self._next_prune = now + 60.0
        self._throttled = {k: v for k, v in self._throttled.items() if v > now}
        # A window is remembered as long as it can still hold the next one back.
        self._windows = {k: v for k, v in self._windows.items() if v > now - self._window_memory}

"""The driver between the source and the outbox: per source, the task states, a poll loop paced by
`poll_interval`, and `apply()`, which both polls and push callbacks go through:
snapshot -> diff -> rules -> one store transaction -> wake the deliverer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import SourceConfig
from bridge.diff import Snapshot, TaskState, diff
from bridge.errors import SourceError
from bridge.metrics import Metrics
from bridge.models import Event
from bridge.rules import Router
from bridge.sources.health import SourceHealth
from bridge.sources.poll import PollingSource
from bridge.store import Store

log = logging.getLogger("bridge.watch")


@dataclass(slots=True)
class Pipeline:
    """Rules -> outbox for the events of one change, committed with the states that produced them.
    The router is swapped whole on reload; `on_event` feeds printing (demo) and metrics."""

    store: Store
    router: Router
    wake: Callable[[], None]
    on_event: list[Callable[[Event], None]] = field(default_factory=list)

    async def publish(
        self,
        source: str,
        states: dict[str, TaskState],
        events: Sequence[Event],
        *,
        now: float,
        seen: bool = True,
    ) -> list[Event]:
        deliveries = self.router.route(events, now) if events else []
        new = await self.store.commit(source, states, events, deliveries, seen=seen)
        if deliveries:
            self.wake()
        for event in new:
            log.info("%s %s %s", event.type, event.source, event.subject)
            for callback in self.on_event:
                callback(event)
        return new


@dataclass(slots=True)
class SourceStatus:
    """What the status page and /readyz show of a source."""

    name: str
    up: bool = True
    last_ok: float | None = None
    last_error: str | None = None
    tracked: int = 0
    unfinished: int = 0
    polls: int = 0


class Watcher:
    """One source. Owns its task states (loaded from the store at start) and serialises every
    change through one lock, so a change seen by poll and push at once is reported once."""

    def __init__(
        self,
        config: SourceConfig,
        source: PollingSource,
        pipeline: Pipeline,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.source = source
        self.pipeline = pipeline
        self.clock = clock
        self.health = SourceHealth(config.name)
        self.status = SourceStatus(config.name)
        self.states: dict[str, TaskState] = {}
        self._seen = False
        self._lock = asyncio.Lock()
        self._loaded = False

    async def load(self) -> None:
        if not self._loaded:
            self.states = await self.pipeline.store.load_tasks(self.config.name)
            self._seen = await self.pipeline.store.source_seen(self.config.name)
            self._loaded = True
            self._count()

    def unfinished(self) -> list[str]:
        return [tid for tid, st in self.states.items() if not st.finished]

    async def apply(self, snapshot: Snapshot, extra: Sequence[Event] = ()) -> list[Event]:
        """Diff one snapshot against the states and commit states, events and deliveries."""
        await self.load()
        async with self._lock:
            now = self.clock()
            silent = not self._seen and not self.config.backfill and snapshot.complete
            result = diff(
                self.config.name,
                self.states,
                snapshot,
                now=now,
                stall_after=self.config.stall_after,
                silent=silent,
            )
            events = [*extra, *result.events]
            if not result.changed and not events and self._seen:
                return []
            new = await self.pipeline.publish(
                self.config.name, result.changed, events, now=now, seen=True
            )
            self.states.update(result.changed)
            if silent and result.changed:
                log.info(
                    "%s: first contact, recorded %d tasks without events (backfill: false)",
                    self.config.name,
                    len(result.changed),
                )
            self._seen = True
            self._count()
            return new

    async def push(self, tasks: list[dict[str, Any]]) -> list[Event]:
        """A push callback: a partial snapshot, diffed like a poll."""
        return await self.apply(Snapshot(tasks=tasks, complete=False))

    async def poll_once(self) -> list[Event]:
        """One poll; a failure is recorded (and maybe becomes source.down), never raised."""
        await self.load()
        now = self.clock()
        started = time.perf_counter()
        try:
            snapshot = await self.source.poll(self.unfinished())
        except SourceError as exc:
            if self.metrics is not None:
                self.metrics.poll(self.config.name, time.perf_counter() - started, False)
            self.status.last_error = f"{exc.reason}: {exc}"
            # Loud once per outage (and when it turns into source.down); quiet while it lasts.
            level = logging.WARNING if self.health.failures == 0 else logging.DEBUG
            log.log(level, "%s: poll failed (%s): %s", self.config.name, exc.reason, exc)
            down = self.health.failure(exc.reason, now, str(exc))
            self.status.up = not self.health.down
            if down is None:
                return []
            log.error("%s: source down after %d failed polls (%s)", *self._outage())
            async with self._lock:
                return await self.pipeline.publish(self.config.name, {}, [down], now=now)
        if self.metrics is not None:
            self.metrics.poll(self.config.name, time.perf_counter() - started, True)
        up = self.health.success(now)
        self.status.up = True
        self.status.last_ok = now
        self.status.polls += 1
        return await self.apply(snapshot, [up] if up is not None else [])

    async def run(self) -> None:
        """Poll until cancelled, pacing by subtracting the work time from the sleep."""
        interval = self.config.poll_interval
        while True:
            started = time.monotonic()
            await self.poll_once()
            wait = self.health.backoff(interval)
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))

    def _outage(self) -> tuple[str, int, str | None]:
        return self.config.name, self.health.failures, self.health.reason

    def _count(self) -> None:
        self.status.tracked = len(self.states)
        self.status.unfinished = sum(1 for st in self.states.values() if not st.finished)

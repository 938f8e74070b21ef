"""The driver between the source and the outbox: per source, the task states (states.py) behind one
lock, and `apply()`, which polls (polling.py: the poll loop), push callbacks and tracked ids all go
through: snapshot -> diff -> (actions.py: seeds) -> rules -> one store transaction -> wake the
deliverer -> (actions.py: what rules ask of the upstream, cancel).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bridge.actions import UpstreamActions
from bridge.config import SourceConfig
from bridge.diff import DiffResult, diff
from bridge.logs import fields
from bridge.metrics import Metrics
from bridge.models import Event, Snapshot, TaskState
from bridge.publish import Publisher
from bridge.sources.health import SourceHealth, SourceStatus
from bridge.sources.modes import Reader
from bridge.sources.normalize import unstorable
from bridge.sources.poll import TaskAPI
from bridge.watch.polling import Poller
from bridge.watch.states import TaskBook

__all__ = ["Watcher"]

log = logging.getLogger("bridge.watch")

# A snapshot of more tasks than this is diffed in a worker thread, off the event loop (a first
# contact with 100,000 tasks diffs for about half a second); a smaller one takes a few ms at most.
OFF_LOOP_TASKS = 2000


class Watcher:
    """One source. Owns its task states (loaded from the store at start) and serialises every
    change through one lock, so a change seen by poll and push at once is reported once. Its
    poll loop (`run`, `poll_once`) is a `Poller` (polling.py)."""

    def __init__(
        self,
        config: SourceConfig,
        source: TaskAPI,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.source = source
        self.publisher = publisher
        self.clock = clock
        self.status = SourceStatus(config.name)
        self._book = TaskBook()
        self._seen = False
        self._lock = asyncio.Lock()
        self._loaded = False
        self.actions = UpstreamActions(config, source, clock)
        self.poller = Poller(
            config, source, self, publisher.store, self.status, clock=clock, metrics=metrics
        )
        if metrics is not None:
            source.on_junk = functools.partial(metrics.junk, config.name)
        source.on_answer = self.poller.moved
        # True while this process holds the source's lease and polls it (app.py); a replica that
        # does not still takes push callbacks and /track for it.
        self.leading = False

    @property
    def states(self) -> dict[str, TaskState]:
        return self._book.states

    @property
    def health(self) -> SourceHealth:
        return self.poller.health

    @property
    def reader(self) -> Reader | None:
        """The way of reading the poll loop chose (None: probe at the next poll)."""
        return self.poller.reader

    @reader.setter
    def reader(self, reader: Reader | None) -> None:
        self.poller.reader = reader

    @property
    def failing(self) -> bool:
        """The last poll failed (not yet long enough for source.down)."""
        return bool(self.health.failures)

    async def run(self) -> None:
        """Poll until cancelled (polling.py); a run is a leadership."""
        await self.poller.run()

    async def poll_once(self) -> list[Event]:
        """One poll; its failure is recorded, never raised (polling.py)."""
        return await self.poller.poll_once()

    def restart(self) -> None:
        """A leadership starts: the next load takes every state from the shared store."""
        self._loaded = False

    async def load(self) -> None:
        """The states as the shared store has them: all of them the first time (and whenever a
        leadership starts); after that only the unfinished ones, merged in. That look is cheap
        (an index) and is how ids added elsewhere reach this watcher: another replica's push or
        /track, or `bridge track` writing to the database."""
        async with self._lock:
            store, name = self.publisher.store, self.config.name
            if not self._seen:
                self._seen = await store.source_seen(name)
            if not self._loaded:
                self._book.reset(await store.load_tasks(name))
                self._loaded = True
            else:
                self._book.merge(await store.load_tasks(name, unfinished=True))
            self._count()

    async def track(self, ids: Iterable[str]) -> list[str]:
        """Follow these task ids from now on (pass-through submits, POST /track, `bridge track`).
        Returns the ids that were new. Their first sighting emits as a first sighting does."""
        await self.load()
        async with self._lock:
            now = self.clock()
            new = self._book.new(ids, now)
            if new:
                await self.publisher.publish(self.config.name, new, [], now=now, seen=self._seen)
                self._book.track(new)
                self._count()
                log.info("%s: tracking %d new task id(s)", self.config.name, len(new))
            return list(new)

    def unfinished(self) -> list[str]:
        return list(self._book.open)

    async def fetch(self, task_id: str) -> dict[str, Any] | None:
        """The task as the upstream serves it now (a push is checked this way); SourceError."""
        return await self.source.fetch(task_id)

    async def push(self, tasks: list[dict[str, Any]]) -> list[Event]:
        """A push callback: a partial snapshot, diffed like a poll."""
        return await self.apply(Snapshot(tasks=tasks, complete=False))

    async def apply(self, snapshot: Snapshot, extra: Sequence[Event] = ()) -> list[Event]:
        """Diff one snapshot against the states and commit states, events and deliveries; then
        carry out what rules ask of the upstream (cancel)."""
        await self.load()
        return await self.apply_loaded(snapshot, extra)

    async def apply_loaded(self, snapshot: Snapshot, extra: Sequence[Event]) -> list[Event]:
        """`apply` once the states are loaded (a poll loads them before it reads)."""
        async with self._lock:
            new = await self._apply(snapshot, extra)
        if new:
            await self.actions.act(new, self.publisher.router)
        return new

    async def announce(self, events: Sequence[Event], now: float) -> list[Event]:
        """Publish events that change no task state (source.down), in turn with the changes."""
        async with self._lock:
            return await self.publisher.publish(
                self.config.name, {}, events, now=now, seen=self._seen
            )

    async def _apply(self, snapshot: Snapshot, extra: Sequence[Event]) -> list[Event]:
        now = self.clock()
        silent = not self._seen and not self.config.backfill and snapshot.complete
        previous, sighted = self._book.sight(task["id"] for task in snapshot.tasks)

        async def run() -> DiffResult:
            def work() -> DiffResult:
                return diff(
                    self.config.name,
                    previous,
                    snapshot,
                    now=now,
                    stall_after=self.config.stall_after,
                    silent=silent,
                )

            # The states change only under the lock, held until the diff is done (a diff whose
            # poll was cancelled meanwhile is thrown away, whatever it met).
            if len(snapshot.tasks) > OFF_LOOP_TASKS:
                return await asyncio.to_thread(work)
            return work()

        result = await run()
        self.poller.moved()
        junk = _unstorable(result.events)
        if junk:
            # Rows the store cannot hold are junk like rows without an id: skipped (so no state
            # moves past them), logged once, counted; a poll that met some concludes nothing
            # missing. The next poll meets them again unless the upstream mends them.
            self._junk(junk)
            snapshot = Snapshot(
                [task for task in snapshot.tasks if task["id"] not in junk],
                frozenset(),
                snapshot.complete,
            )
            self._book.unsight(sighted & junk.keys())
            result = await run()
        events = [*extra, *result.events]
        if not result.changed and not events and self._seen:
            return []
        await self.actions.finish(events)
        new = await self.publisher.publish(
            self.config.name, result.changed, events, now=now, seen=True, progress=self.poller.moved
        )
        self._book.record(result.changed)
        if silent and result.changed:
            log.info(
                "%s: first contact, recorded %d tasks without events (backfill: false)",
                self.config.name,
                len(result.changed),
            )
        self._seen = True
        self._count()
        return new

    def _junk(self, junk: Mapping[str, str]) -> None:
        reasons = Counter(junk.values())
        if self.metrics is not None:
            self.metrics.junk(self.config.name, reasons)
        why = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
        log.warning(
            "%s: %d unusable task row(s) (%s), skipped; no task is concluded missing from this "
            "look",
            self.config.name,
            len(junk),
            why,
            extra=fields(source=self.config.name),
        )

    def _count(self) -> None:
        self.status.tracked = len(self._book.states)
        self.status.unfinished = len(self._book.open)


def _unstorable(events: Sequence[Event]) -> dict[str, str]:
    """The task ids among these events whose task cannot be stored, and why."""
    junk: dict[str, str] = {}
    for event in events:
        if event.task is not None and (why := unstorable(event.task)) is not None:
            junk[event.subject] = why
    return junk

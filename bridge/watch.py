"""The driver between the source and the outbox: per source, the task states, a poll loop paced by
`poll_interval`, and `apply()`, which polls, push callbacks and tracked ids all go through:
snapshot -> diff -> (actions.py: seeds) -> rules -> one store transaction -> wake the deliverer
-> (actions.py: what rules ask of the upstream, cancel).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from bridge.actions import UpstreamActions
from bridge.config import SourceConfig
from bridge.diff import DiffResult, diff
from bridge.errors import SourceError, StoreError
from bridge.logs import fields
from bridge.metrics import Metrics
from bridge.models import Event, Snapshot, TaskState
from bridge.publish import Publisher
from bridge.sources.health import SourceHealth, SourceStatus
from bridge.sources.modes import Reader
from bridge.sources.normalize import unstorable
from bridge.sources.poll import TaskAPI
from bridge.sources.probe import choose_reader

log = logging.getLogger("bridge.watch")

# A snapshot of more tasks than this is diffed in a worker thread, off the event loop (a first
# contact with 100,000 tasks diffs for about half a second); a smaller one takes a few ms at most.
OFF_LOOP_TASKS = 2000


class Watcher:
    """One source. Owns its task states (loaded from the store at start) and serialises every
    change through one lock, so a change seen by poll and push at once is reported once."""

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
        self.health = SourceHealth(config.name)
        self.status = SourceStatus(config.name)
        self.states: dict[str, TaskState] = {}
        self.reader: Reader | None = None
        self._seen = False
        self._lock = asyncio.Lock()
        self._loaded = False
        self._fresh: set[str] = set()  # tracked ids never seen upstream yet
        self._open: set[str] = set()  # ids of the unfinished tasks, kept with `states`
        self.actions = UpstreamActions(config, source, clock)
        self._internal_seen: str | None = None  # the last internal error logged with its trace
        if metrics is not None:
            source.on_junk = functools.partial(metrics.junk, config.name)
        source.on_answer = self._moved
        # True while this process holds the source's lease and polls it (app.py); a replica that
        # does not still takes push callbacks and /track for it.
        self.leading = False

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
                self.states = await store.load_tasks(name)
                self._fresh = {tid for tid, st in self.states.items() if _placeholder(st)}
                self._open = {tid for tid, st in self.states.items() if not st.finished}
                self._loaded = True
            else:
                stored = await store.load_tasks(name, unfinished=True)
                for tid in self._open - stored.keys():  # finished where another process saw it
                    self.states[tid] = replace(self.states[tid], finished=True)
                    self._open.discard(tid)
                    self._fresh.discard(tid)
                for tid, st in stored.items():
                    if self.states.get(tid) != st:
                        self.states[tid] = st
                        self._open.add(tid)
                        if _placeholder(st):
                            self._fresh.add(tid)
            self._count()

    async def track(self, ids: Iterable[str]) -> list[str]:
        """Follow these task ids from now on (pass-through submits, POST /track, `bridge track`).
        Returns the ids that were new. Their first sighting emits as a first sighting does."""
        await self.load()
        async with self._lock:
            now = self.clock()
            new = {tid: TaskState("", -1, now) for tid in dict.fromkeys(ids) if tid}
            new = {tid: st for tid, st in new.items() if tid not in self.states}
            if new:
                await self.publisher.publish(self.config.name, new, [], now=now, seen=self._seen)
                self._record(new)
                self._fresh.update(new)
                self._count()
                log.info("%s: tracking %d new task id(s)", self.config.name, len(new))
            return list(new)

    def unfinished(self) -> list[str]:
        return list(self._open)

    @property
    def failing(self) -> bool:
        """The last poll failed (not yet long enough for source.down)."""
        return bool(self.health.failures)

    async def fetch(self, task_id: str) -> dict[str, Any] | None:
        """The task as the upstream serves it now (a push is checked this way); SourceError."""
        return await self.source.fetch(task_id)

    def _record(self, changed: Mapping[str, TaskState]) -> None:
        """Take the states a commit wrote; the unfinished index follows without a full scan."""
        self.states.update(changed)
        for tid, st in changed.items():
            if st.finished:
                self._open.discard(tid)
            else:
                self._open.add(tid)

    async def apply(self, snapshot: Snapshot, extra: Sequence[Event] = ()) -> list[Event]:
        """Diff one snapshot against the states and commit states, events and deliveries; then
        carry out what rules ask of the upstream (cancel)."""
        await self.load()
        return await self._apply_loaded(snapshot, extra)

    async def _apply_loaded(self, snapshot: Snapshot, extra: Sequence[Event]) -> list[Event]:
        async with self._lock:
            new = await self._apply(snapshot, extra)
        if new:
            await self.actions.act(new, self.publisher.router)
        return new

    async def _apply(self, snapshot: Snapshot, extra: Sequence[Event]) -> list[Event]:
        now = self.clock()
        silent = not self._seen and not self.config.backfill and snapshot.complete
        previous: Mapping[str, TaskState] = self.states
        sighted: set[str] = set()
        if self._fresh:
            # A tracked id seen for the first time is new to the diff, so it emits its state.
            sighted = self._fresh.intersection(task["id"] for task in snapshot.tasks)
            if sighted:
                previous = _Hiding(self.states, sighted)
                self._fresh -= sighted

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
        self._moved()
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
            self._fresh |= sighted & junk.keys()
            result = await run()
        events = [*extra, *result.events]
        if not result.changed and not events and self._seen:
            return []
        await self.actions.finish(events)
        new = await self.publisher.publish(
            self.config.name, result.changed, events, now=now, seen=True, progress=self._moved
        )
        self._record(result.changed)
        if self._fresh:
            self._fresh -= {tid for tid, st in result.changed.items() if st.finished}
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

    async def push(self, tasks: list[dict[str, Any]]) -> list[Event]:
        """A push callback: a partial snapshot, diffed like a poll."""
        return await self.apply(Snapshot(tasks=tasks, complete=False))

    async def poll_once(self) -> list[Event]:
        """One poll; a failure is recorded (and maybe becomes source.down), never raised. So is
        an unexpected exception in reading, diffing or committing (reason `internal`, its
        traceback logged once): one bad answer stops this source, never the bridge. Only a
        StoreError (the store's own failure, for app.py to decide on) goes up.
        `status.polling_since` says a poll is in progress (/readyz, the status page), and
        `status.moved_at` when it last moved on (an answer read, a step of storing it)."""
        self.status.polling_since = self.status.moved_at = self.clock()
        try:
            return await self._poll_once()
        finally:
            self.status.polling_since = self.status.moved_at = None

    def _moved(self) -> None:
        """The poll in progress moved on: it is working, not hanging (see `readiness`)."""
        if self.status.polling_since is not None:
            self.status.moved_at = self.clock()

    async def _poll_once(self) -> list[Event]:
        await self.load()
        now = self.clock()
        started = time.perf_counter()
        try:
            reader = await self._reader()
            snapshot = await reader.read(self.unfinished(), self.states, now)
            self._moved()
            self._noted(reader.note)
        except SourceError as exc:
            return await self._failed(exc, now, started)
        except StoreError:
            raise
        except Exception as exc:
            return await self._failed(self._internal("reading", exc), now, started)
        try:
            up = self.health.recovered(now)
            new = await self._apply_loaded(snapshot, [up] if up is not None else [])
        except StoreError:
            raise
        except Exception as exc:
            return await self._failed(self._internal("storing", exc), now, started)
        if self.metrics is not None:
            self.metrics.poll(self.config.name, time.perf_counter() - started, True)
        if self.health.failures:  # the outage (or the run of failures) is over for everyone
            await self.publisher.store.save_outage(self.config.name, None)
        self.health.success(now)
        self._internal_seen = None
        self.status.up = True
        self.status.last_ok = self.clock()  # when it ended: a long poll is not stale on arrival
        self.status.polls += 1
        return new

    def _internal(self, stage: str, exc: Exception) -> SourceError:
        """An unexpected exception as this source's failure; its traceback is logged once (again
        only when a different one comes)."""
        text = self.source.redact(f"{type(exc).__name__}: {exc}")[:300]
        if text != self._internal_seen:
            self._internal_seen = text
            log.error(
                "%s: internal error while %s the upstream's answer; the source counts it as a "
                "failed poll",
                self.config.name,
                stage,
                exc_info=exc,
                extra=fields(source=self.config.name),
            )
        return SourceError("internal", f"internal error while {stage} the answer: {text}")

    async def _failed(self, exc: SourceError, now: float, started: float) -> list[Event]:
        if self.metrics is not None:
            self.metrics.poll(self.config.name, time.perf_counter() - started, False)
        self.status.last_error = f"{exc.reason}: {exc}"
        self.status.last_error_at = now
        # Loud once per outage (and when it turns into source.down); quiet while it lasts.
        level = logging.WARNING if self.health.failures == 0 else logging.DEBUG
        log.log(
            level,
            "%s: poll failed (%s): %s",
            self.config.name,
            exc.reason,
            exc,
            extra=fields(source=self.config.name),
        )
        down = self.health.failure(exc.reason, now, str(exc))
        self.status.up = not self.health.down
        if down is None:
            await self.publisher.store.save_outage(self.config.name, self.health.outage())
            return []
        log.error(
            "%s: source down after %d failed polls (%s)",
            *self._outage(),
            extra=fields(source=self.config.name),
        )
        self.reader = None  # probe again once it answers: it may be another server now
        async with self._lock:
            new = await self.publisher.publish(
                self.config.name, {}, [down], now=now, seen=self._seen
            )
        # Kept after its source.down is stored: a crash in between decides the same outage again,
        # and the same event id is stored once.
        await self.publisher.store.save_outage(self.config.name, self.health.outage())
        return new

    async def run(self) -> None:
        """Poll until cancelled, pacing by subtracting the work time from the sleep. A run is a
        leadership: it starts from the shared store's states and source health, whatever this
        watcher held (a reload builds a new watcher; a failover moves the source elsewhere)."""
        self._loaded = False
        self.health.restore(await self.publisher.store.load_outage(self.config.name))
        self.status.up = not self.health.down
        if self.health.down:
            log.warning(
                "%s: still down (%d failed polls, %s); source.up follows its first good poll",
                *self._outage(),
                extra=fields(source=self.config.name),
            )
        interval = self.config.poll_interval
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except StoreError:
                raise  # the store's own failure: app.py decides what it means for the process
            except Exception:
                # poll_once records every failure of a poll; this is a bug in recording one.
                log.exception(
                    "%s: unexpected error after a poll; polling goes on",
                    self.config.name,
                    extra=fields(source=self.config.name),
                )
            wait = self.health.backoff(interval)
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))

    async def _reader(self) -> Reader:
        if self.reader is None:
            reader, why = await choose_reader(self.config, self.source)
            log.info(
                "%s: reading in %s mode: %s (%s)", self.config.name, reader.mode, reader.how, why
            )
            self.reader = reader
            self.status.mode = reader.mode
            self.status.mode_reason = why
        return self.reader

    def _noted(self, note: str) -> None:
        """Say once, plainly, when the way of reading starts (or stops) allowing a delay."""
        if note == self.status.note:
            return
        if note:
            log.warning("%s: %s", self.config.name, note)
        elif self.status.note:
            log.info("%s: the list is small again: read whole each poll", self.config.name)
        self.status.note = note

    def _outage(self) -> tuple[str, int, str | None]:
        return self.config.name, self.health.failures, self.health.reason

    def _count(self) -> None:
        self.status.tracked = len(self.states)
        self.status.unfinished = len(self._open)


def _unstorable(events: Sequence[Event]) -> dict[str, str]:
    """The task ids among these events whose task cannot be stored, and why."""
    junk: dict[str, str] = {}
    for event in events:
        if event.task is not None and (why := unstorable(event.task)) is not None:
            junk[event.subject] = why
    return junk


def _placeholder(state: TaskState) -> bool:
    """A tracked id the upstream has not shown yet (see Watcher.track)."""
    return state.status == "" and state.progress == -1 and not state.finished


class _Hiding(Mapping[str, TaskState]):
    """The states with some ids hidden: the diff sees those tasks as new."""

    __slots__ = ("_hidden", "_states")

    def __init__(self, states: Mapping[str, TaskState], hidden: set[str]) -> None:
        self._states = states
        self._hidden = hidden

    def __getitem__(self, key: str) -> TaskState:
        if key in self._hidden:
            raise KeyError(key)
        return self._states[key]

    def get(self, key: str, default: Any = None) -> Any:
        return default if key in self._hidden else self._states.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._states if k not in self._hidden)

    def __len__(self) -> int:
        return len(self._states) - len(self._hidden)

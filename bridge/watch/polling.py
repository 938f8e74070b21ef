"""One source's poll loop: a poll every `poll_interval`, paced by subtracting the work time from the
sleep, backed off while it fails (sources/health.py); the way of reading chosen once (probe.py);
each failure recorded (source.down, the outage the store keeps); what /readyz and the status page
read of polls in progress. What a poll read goes through the watcher's `apply` (watch/__init__.py).
Pipeline: **source** -> snapshot -> diff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from bridge.config import SourceConfig
from bridge.errors import SourceError, StoreError
from bridge.logs import fields
from bridge.metrics import Metrics
from bridge.models import Event, Outage, Snapshot, TaskState
from bridge.sources.health import SourceHealth, SourceStatus
from bridge.sources.modes import Reader
from bridge.sources.poll import TaskAPI
from bridge.sources.probe import choose_reader

__all__ = ["Changes", "Outages", "Poller"]

log = logging.getLogger("bridge.watch")


class Changes(Protocol):
    """What the poll loop asks of its source's watcher: the states, and a way in for changes."""

    @property
    def states(self) -> Mapping[str, TaskState]: ...
    def unfinished(self) -> list[str]: ...
    def restart(self) -> None: ...
    async def load(self) -> None: ...
    async def apply_loaded(self, snapshot: Snapshot, extra: Sequence[Event]) -> list[Event]: ...
    async def announce(self, events: Sequence[Event], now: float) -> list[Event]: ...


class Outages(Protocol):
    """Where a source's run of failed polls is kept (the store, `roles.TaskStates`)."""

    async def load_outage(self, source: str) -> Outage | None: ...
    async def save_outage(self, source: str, outage: Outage | None) -> None: ...


class Poller:
    """Polls one source for as long as this process leads it (app.py runs `run()`)."""

    def __init__(
        self,
        config: SourceConfig,
        source: TaskAPI,
        changes: Changes,
        outages: Outages,
        status: SourceStatus,
        *,
        clock: Callable[[], float],
        metrics: Metrics | None,
    ) -> None:
        self.config = config
        self.source = source
        self.changes = changes
        self.outages = outages
        self.status = status
        self.clock = clock
        self.metrics = metrics
        self.health = SourceHealth(config.name)
        self.reader: Reader | None = None
        self._internal_seen: str | None = None  # the last internal error logged with its trace

    async def run(self) -> None:
        """Poll until cancelled, pacing by subtracting the work time from the sleep. A run is a
        leadership: it starts from the shared store's states and source health, whatever this
        watcher held (a reload builds a new watcher; a failover moves the source elsewhere)."""
        self.changes.restart()
        self.health.restore(await self.outages.load_outage(self.config.name))
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

    def moved(self) -> None:
        """The poll in progress moved on: it is working, not hanging (see `readiness`)."""
        if self.status.polling_since is not None:
            self.status.moved_at = self.clock()

    async def _poll_once(self) -> list[Event]:
        changes = self.changes
        await changes.load()
        now = self.clock()
        started = time.perf_counter()
        try:
            reader = await self._reader()
            snapshot = await reader.read(changes.unfinished(), changes.states, now)
            self.moved()
            self._noted(reader.note)
        except SourceError as exc:
            return await self._failed(exc, now, started)
        except StoreError:
            raise
        except Exception as exc:
            return await self._failed(self._internal("reading", exc), now, started)
        try:
            up = self.health.recovered(now)
            new = await changes.apply_loaded(snapshot, [up] if up is not None else [])
        except StoreError:
            raise
        except Exception as exc:
            return await self._failed(self._internal("storing", exc), now, started)
        if self.metrics is not None:
            self.metrics.poll(self.config.name, time.perf_counter() - started, True)
        if self.health.failures:  # the outage (or the run of failures) is over for everyone
            await self.outages.save_outage(self.config.name, None)
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
            await self.outages.save_outage(self.config.name, self.health.outage())
            return []
        log.error(
            "%s: source down after %d failed polls (%s)",
            *self._outage(),
            extra=fields(source=self.config.name),
        )
        self.reader = None  # probe again once it answers: it may be another server now
        new = await self.changes.announce([down], now)
        # Kept after its source.down is stored: a crash in between decides the same outage again,
        # and the same event id is stored once.
        await self.outages.save_outage(self.config.name, self.health.outage())
        return new

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

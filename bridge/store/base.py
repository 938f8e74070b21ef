"""The outbox stage's one interface: what every store backend (SQLite, PostgreSQL) offers the
watchers, the deliverer, the server and the commands (each takes only its role, bridge/roles.py),
and the queries both backends run alike, written once here with `?` placeholders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import orjson

from bridge.errors import StoreError
from bridge.models import Delivery, Event, Outage, OutboxItem, TaskState
from bridge.store.holders import CLAIM_TIMEOUT, forget_holder, holder_gone, new_holder
from bridge.store.retry import Retrier
from bridge.store.rows import (
    COMMIT_CHUNK,
    PRUNE_BATCH,
    OutboxRow,
    RecentPayloads,
    chunks,
    item_from_row,
)
from bridge.store.rows import ITEM_COLUMNS as _ITEM

if TYPE_CHECKING:
    from bridge.store.history import History

log = logging.getLogger("bridge.store")


def is_postgres(url_or_path: str) -> bool:
    return url_or_path.startswith(("postgresql://", "postgres://"))


class Store(ABC):
    """Task state, events, outbox, dead letters, message references, leases and source health.

    `Store.open(url_or_path)` picks the backend: a `postgresql://` URL opens PostgreSQL, anything
    else is the path of a SQLite file. Several processes may share either (replicas; commands
    beside a running bridge). Every call is one transaction; a driver error is a `StoreError`,
    and transient ones are retried first (bridge/store/retry.py).
    """

    #: This process in leases and delivery claims (see bridge/store/holders.py).
    holder: str
    #: Seconds a claim of this process outlives it (renewed by `keep_claims` meanwhile).
    claim_timeout: float = CLAIM_TIMEOUT
    #: Runs every call, again while it fails transiently; `retrier.trouble` feeds /readyz.
    retrier: Retrier
    #: How each backend joins an outbox row `o` to its event `e`, and says "not finished".
    _JOIN_EVENTS: str
    _UNFINISHED: str

    def __init__(self, where: str) -> None:
        """What every backend keeps beside its connection; `where` names the database."""
        self.holder = new_holder()
        self.retrier = Retrier(where)
        # The JSON of the events this process committed last, for the claims that follow.
        self._payloads = RecentPayloads()

    @classmethod
    async def open(cls, url_or_path: str, *, readonly: bool = False) -> Store:
        """Open (creating or migrating) the store; `readonly` for commands that only look (then
        the schema must be current: `bridge run` upgrades it). Opening changes nothing else:
        claims and leases are recovered only by the process that delivers (`recover`)."""
        if is_postgres(url_or_path):
            from bridge.store.postgres import PostgresStore

            return await PostgresStore.open(url_or_path, readonly=readonly)
        from bridge.store.sqlite import SqliteStore

        return await SqliteStore.open(url_or_path, readonly=readonly)

    @abstractmethod
    async def _close(self) -> None: ...

    async def close(self) -> None:
        forget_holder(self.holder)
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """One statement (`?` placeholders) in a transaction of its own; its rows."""

    # -- task state -------------------------------------------------------------------------

    async def load_tasks(self, source: str, *, unfinished: bool = False) -> dict[str, TaskState]:
        """The task states of `source`; with `unfinished`, only those not finished (few: an index
        keeps this cheap for the leader's look at ids other replicas or `bridge track` added)."""
        rows = await self._fetch(
            "SELECT id, status, progress, changed_at, stalled, missing, finished "
            "FROM tasks WHERE source = ?" + (self._UNFINISHED if unfinished else ""),
            source,
        )
        return {
            r[0]: TaskState(
                status=r[1],
                progress=r[2],
                changed_at=r[3],
                stalled=bool(r[4]),
                missing=r[5],
                finished=bool(r[6]),
            )
            for r in rows
        }

    async def source_seen(self, source: str) -> bool:
        rows = await self._fetch("SELECT seen FROM sources WHERE name = ?", source)
        return bool(rows and rows[0][0])

    async def load_outage(self, source: str) -> Outage | None:
        """The source's health as its last poller left it (None: healthy, or never polled)."""
        rows = await self._fetch("SELECT outage FROM sources WHERE name = ?", source)
        if not rows or rows[0][0] is None:
            return None
        return Outage.from_json(orjson.loads(rows[0][0]))

    async def save_outage(self, source: str, outage: Outage | None) -> None:
        """Keep the source's health (None: healthy) for the next poller: after a reload, or on
        another replica after a failover, one outage stays one source.down and one source.up."""
        text = None if outage is None else orjson.dumps(outage.to_json()).decode()
        await self._fetch(
            "INSERT INTO sources (name, outage) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET outage = excluded.outage",
            source,
            text,
        )

    async def commit(
        self,
        source: str,
        states: Mapping[str, TaskState],
        events: Sequence[Event],
        deliveries: Sequence[Delivery],
        *,
        seen: bool = True,
        progress: Callable[[], None] | None = None,
        step: Callable[[], None] | None = None,
    ) -> list[Event]:
        """Store one snapshot's changes: the events not stored yet with their deliveries, then the
        task states (and `seen`). Returns the new events, in the order given.

        Events go in transactions of up to COMMIT_CHUNK, each with its deliveries; the states go
        with the last. States never run ahead of the events they produced, so a crash between two
        transactions re-detects the rest, under the same event ids: nothing is lost and nothing is
        stored (or sent) twice. `progress()` is called after each transaction but the last that
        stored new deliveries, so sending starts before a large snapshot is all stored; `step()`
        after each transaction but the last, whatever it stored (the poll is moving on)."""
        candidates: dict[str, Event] = {e.id: e for e in events}
        owed: dict[str, list[Delivery]] = {}
        for d in deliveries:
            candidates.setdefault(d.event.id, d.event)
            owed.setdefault(d.event.id, []).append(d)
        parts = list(chunks(list(candidates.values()), COMMIT_CHUNK)) or [[]]
        new: list[Event] = []
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            part_deliveries = [d for e in part for d in owed.get(e.id, ())]
            stored = await self._commit(
                source, states if last else {}, part, part_deliveries, seen=seen and last
            )
            new += stored
            if not last and step is not None:
                step()
            if not last and progress is not None and any(e.id in owed for e in stored):
                progress()
        order = {e.id: i for i, e in enumerate(events)}
        return sorted(new, key=lambda e: order.get(e.id, len(order)))

    @abstractmethod
    async def _commit(
        self,
        source: str,
        states: Mapping[str, TaskState],
        events: Sequence[Event],
        deliveries: Sequence[Delivery],
        *,
        seen: bool,
    ) -> list[Event]:
        """ONE transaction: upsert `states`, insert those of `events` not stored yet, and the
        `deliveries` (all of them of `events`) of the new ones, those with an `error` (a template
        over a limit) as dead letters with that reason. Returns the new events."""

    # -- outbox -----------------------------------------------------------------------------

    @abstractmethod
    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due deliveries of `target`, oldest first, marked in flight by `holder` until
        `claim_timeout` from now, so no other worker or process takes them."""

    @abstractmethod
    async def release(self, ids: Sequence[str]) -> None:
        """Hand claimed deliveries back without counting an attempt (shutdown)."""

    @abstractmethod
    async def renew_claims(self) -> None:
        """Push this process's claims' expiry `claim_timeout` seconds from now."""

    @abstractmethod
    async def recover(self) -> int:
        """Hand back the deliveries claimed by holders that are gone (`holder_gone`) or whose
        claims expired, and drop the leases of gone holders. Only the process that delivers
        calls this (`Deliverer.run`), never a command. Returns how many deliveries."""

    async def _gone_holders(self) -> list[str]:
        """The holders of claims and leases that surely no longer run (`holder_gone`)."""
        rows = await self._fetch(
            "SELECT DISTINCT claimed_by FROM outbox WHERE state = 'inflight' "
            "UNION SELECT holder FROM leases"
        )
        return [r[0] for r in rows if r[0] is not None and holder_gone(r[0])]

    async def keep_claims(self) -> None:
        """While this process delivers: renew its claims and recover others' every third of
        `claim_timeout`; until cancelled. A store error is logged and tried again next time."""
        while True:
            await asyncio.sleep(self.claim_timeout / 3)
            try:
                await self.renew_claims()
                await self.recover()
            except StoreError as exc:
                log.warning("claims not renewed: %s; tried again soon", exc)

    @abstractmethod
    async def mark_sent(self, ids: Sequence[str]) -> None: ...

    @abstractmethod
    async def mark_retry(self, id: str, next_at: float, error: str) -> None: ...

    @abstractmethod
    async def mark_dead(self, id: str, error: str) -> None: ...

    @abstractmethod
    async def abandon(self, targets: Collection[str]) -> dict[str, int]:
        """Deliveries waiting for a target that is no longer configured become dead letters (the
        config changed under them): listed by `bridge dlq list`, replayable if it comes back.
        Returns how many per target. In-flight ones are left to whoever holds them."""

    @abstractmethod
    async def next_due(self, target: str) -> float | None:
        """When the next delivery of `target` can be claimed (None: nothing waits)."""

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[OutboxItem]:
        rows = await self._fetch(
            f"SELECT {_ITEM} FROM outbox o {self._JOIN_EVENTS} "
            "WHERE o.state = 'dead' ORDER BY o.updated_at DESC, o.id LIMIT ?",
            limit,
        )
        return [item_from_row(r) for r in rows]

    @abstractmethod
    async def replay(self, ids: Sequence[str] | None) -> int:
        """Put dead letters back in the outbox (None: all of them), due now with fresh attempts
        and a fresh age, so `max_attempts` and `max_age` count from the replay."""

    # -- what the status page, metrics and history read -------------------------------------

    @property
    @abstractmethod
    def history(self) -> History:
        """Read-only queries of what happened: events, tasks, deliveries, dead letters."""

    async def recent_events(self, limit: int = 50) -> list[Event]:
        rows = await self._fetch(
            "SELECT json FROM events ORDER BY time DESC, seq DESC LIMIT ?", limit
        )
        return [Event.from_cloudevent(orjson.loads(r[0])) for r in rows]

    async def recent_deliveries(self, limit: int = 50) -> list[OutboxRow]:
        """The latest deliveries in any state, newest first (status page)."""
        rows = await self._fetch(
            f"SELECT {_ITEM}, o.state, o.updated_at FROM outbox o {self._JOIN_EVENTS} "
            "ORDER BY o.updated_at DESC, o.id LIMIT ?",
            limit,
        )
        return [OutboxRow(item_from_row(r), r[11], r[12]) for r in rows]

    async def outbox_depth(self) -> dict[str, int]:
        """Deliveries still waiting (pending or in flight) per target."""
        rows = await self._fetch(
            "SELECT target, COUNT(*) FROM outbox WHERE state IN ('pending', 'inflight') "
            "GROUP BY target"
        )
        return {r[0]: r[1] for r in rows}

    async def dead_count(self) -> dict[str, int]:
        """Dead letters per target (metrics)."""
        rows = await self._fetch(
            "SELECT target, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY target"
        )
        return {r[0]: r[1] for r in rows}

    # -- retention --------------------------------------------------------------------------

    async def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete sent deliveries last updated before `before` (epoch seconds), then the events
        older than `before` that no delivery names any more: dead letters and deliveries still
        owed keep theirs. Task states stay (they stop a finished task from emitting again).
        `batch` rows per statement, each its own transaction. Returns (deliveries, events)."""
        deliveries = 0
        while True:
            count = await self._prune_sent(before, batch)
            deliveries += count
            if count < batch:
                break
        # Events are walked once in time order, a window of `batch` at a time: the old ones a
        # dead letter keeps are passed over rather than looked at again by every batch.
        events = 0
        low: tuple[float, int] | None = (float("-inf"), 0)
        while low is not None:
            gone, low = await self._prune_window(before, low, batch)
            events += gone
        return deliveries, events

    @abstractmethod
    async def _prune_sent(self, before: float, batch: int) -> int:
        """ONE statement: delete up to `batch` sent deliveries last updated before `before`.
        Returns how many."""

    @abstractmethod
    async def _prune_window(
        self, before: float, low: tuple[float, int], batch: int
    ) -> tuple[int, tuple[float, int] | None]:
        """Delete the events older than `before` that no delivery names among the (up to)
        `batch` after `low`, a (time, tie-breaker) position. Returns how many, and where the next
        window starts (None: this was the last)."""

    # -- message references -----------------------------------------------------------------

    async def get_message(self, target: str, key: str) -> str | None:
        """The reference a target kept for `key` (e.g. "source:task_id"): the chat message to
        edit for that task. None when it has none yet."""
        rows = await self._fetch(
            "SELECT ref FROM messages WHERE target = ? AND key = ?", target, key
        )
        return str(rows[0][0]) if rows else None

    async def put_message(self, target: str, key: str, ref: str) -> None:
        """Remember (or replace) the reference a target keeps for `key`."""
        await self._fetch(
            "INSERT INTO messages (target, key, ref, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (target, key) DO UPDATE SET ref = excluded.ref, "
            "updated_at = excluded.updated_at",
            target,
            key,
            ref,
            time.time(),
        )

    # -- leases -----------------------------------------------------------------------------

    @abstractmethod
    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease `name` for `ttl` seconds if it is free, expired or already ours (then
        it is renewed). True when `holder` holds it now."""

    @abstractmethod
    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Extend our lease by `ttl` seconds from now; False when another holder has it."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (if ours), so another process takes it at once."""
        await self._fetch("DELETE FROM leases WHERE name = ? AND holder = ?", name, holder)

    @abstractmethod
    async def lease(self, name: str) -> tuple[str, float] | None:
        """(holder, seconds until it expires) of a lease held now; None when it is free."""

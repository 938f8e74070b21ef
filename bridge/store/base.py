"""The outbox stage's one interface: what every store backend (SQLite, PostgreSQL) offers the
watchers, the deliverer, the server and `bridge dlq`, and the records it hands back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import orjson

from bridge.diff import TaskState
from bridge.errors import StoreError
from bridge.models import Delivery, Event

if TYPE_CHECKING:
    from bridge.store.history import History

T = TypeVar("T")

log = logging.getLogger("bridge.store")

#: Seconds a delivery claim outlives a process that stopped renewing it (renewed every third).
CLAIM_TIMEOUT = 30.0


class OutboxItem:
    """One delivery as the outbox holds it: what to send, and how it went so far.

    The event travels as the CloudEvents JSON it was stored as (`payload`) and is parsed only when
    a target asks for `event`: a webhook sends the stored bytes as they are, so claiming and
    sending a delivery never parses and re-serialises its event (the delivery hot path)."""

    __slots__ = (
        "_event",
        "_payload",
        "attempts",
        "body",
        "created_at",
        "group",
        "id",
        "last_error",
        "next_at",
        "rule",
        "target",
        "title",
    )

    def __init__(
        self,
        *,
        id: str,
        target: str,
        rule: str,
        title: str,
        body: str,
        group: str | None,
        attempts: int,
        created_at: float,
        next_at: float,
        last_error: str | None,
        event: Event | None = None,
        payload: bytes | None = None,
    ) -> None:
        if event is None and payload is None:
            raise ValueError("an OutboxItem needs its event or the event's JSON")
        self.id = id
        self.target = target
        self.rule = rule
        self.title = title
        self.body = body
        self.group = group
        self.attempts = attempts
        self.created_at = created_at
        self.next_at = next_at
        self.last_error = last_error
        self._event = event
        self._payload = payload

    @property
    def event(self) -> Event:
        if self._event is None:
            assert self._payload is not None
            self._event = Event.from_cloudevent(orjson.loads(self._payload))
        return self._event

    @property
    def event_id(self) -> str:
        """The event's id without parsing it: the outbox id is `{event id}:{target}`."""
        suffix = ":" + self.target
        return self.id.removesuffix(suffix) if self.id.endswith(suffix) else self.event.id

    @property
    def payload(self) -> bytes:
        """The event as CloudEvents JSON: the webhook body."""
        if self._payload is None:
            self._payload = event_json(self.event)
        return self._payload

    def __repr__(self) -> str:
        return f"OutboxItem(id={self.id!r}, target={self.target!r}, attempts={self.attempts})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutboxItem):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in _ITEM_FIELDS)

    __hash__ = None  # type: ignore[assignment]


_ITEM_FIELDS = (
    "id",
    "target",
    "rule",
    "title",
    "body",
    "group",
    "attempts",
    "created_at",
    "next_at",
    "last_error",
    "event",
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox item with its state, for the status page."""

    item: OutboxItem
    state: str
    updated_at: float


#: Rows deleted per statement (and transaction) by `Store.prune`: a large first prune never holds
#: the write lock for long.
PRUNE_BATCH = 5000


def is_postgres(url_or_path: str) -> bool:
    return url_or_path.startswith(("postgresql://", "postgres://"))


#: The holders of the stores open in this process (a test may open several on one file).
_OPEN_HOLDERS: set[str] = set()


def new_holder() -> str:
    """Who this process is, in leases and claims: host, pid and a random tail (pids repeat)."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    _OPEN_HOLDERS.add(holder)
    return holder


def holder_gone(holder: str) -> bool:
    """True when `holder` (host:pid:tail) surely no longer runs: it names this host and a process
    that is not running, or this very process (pid 1 again after a container restart) but no
    store open here. Holders on other hosts are never judged: their claims and leases expire."""
    host, _, rest = holder.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return holder not in _OPEN_HOLDERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def log_recovered(count: int, gone: Sequence[str]) -> None:
    if count:
        whose = ", ".join(describe_holder(h) for h in gone) or "expired claims"
        log.warning(
            "%d deliveries claimed by a process that is gone (%s) go back to the outbox",
            count,
            whose,
        )


def describe_holder(holder: str) -> str:
    """A holder for people: "pid 123 on host web-1"."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on {host}" if pid.isdigit() else holder


def event_json(event: Event) -> bytes:
    return orjson.dumps(event.cloudevent())


def item_from_row(row: Sequence[Any], payload: bytes | None = None) -> OutboxItem:
    """An OutboxItem from the columns id, target, rule, event json, title, body, group,
    attempts, created_at, next_at, last_error (in that order). With `payload`, the fourth column
    is not read (a claim returns the event id there, see RecentPayloads)."""
    return OutboxItem(
        id=row[0],
        target=row[1],
        rule=row[2],
        payload=bytes(row[3]) if payload is None else payload,
        title=row[4],
        body=row[5],
        group=row[6],
        attempts=row[7],
        created_at=row[8],
        next_at=row[9],
        last_error=row[10],
    )


#: Events per transaction of a snapshot (Store.commit): about 1 MB of JSON, a few tens of
#: milliseconds of the database's time; the first deliveries of a large snapshot go out while
#: the rest is stored.
COMMIT_CHUNK = 500

#: How much event JSON a store keeps in memory after committing it (RecentPayloads).
RECENT_PAYLOAD_BYTES = 16 * 1024 * 1024


class RecentPayloads:
    """The JSON of the events this process committed last, up to `limit` bytes (the oldest go
    first), for the claims that follow. On a busy bridge a snapshot's deliveries are claimed
    moments after it was committed; reading each event's ~2 KB back out of the database was most
    of a claim's cost. An event's JSON never changes once stored, so an entry is never stale; a
    claim that misses (a retry, a replay, another replica's event) reads the database."""

    def __init__(self, limit: int = RECENT_PAYLOAD_BYTES) -> None:
        self._limit = limit
        self._size = 0
        self._items: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event_id: str, payload: bytes) -> None:
        if len(payload) > self._limit:
            return
        old = self._items.pop(event_id, None)
        if old is not None:
            self._size -= len(old)
        self._items[event_id] = payload
        self._size += len(payload)
        while self._size > self._limit:
            oldest = next(iter(self._items))
            self._size -= len(self._items.pop(oldest))

    def get(self, event_id: str) -> bytes | None:
        return self._items.get(event_id)


async def claimed_items(
    rows: Sequence[Sequence[Any]],
    recent: RecentPayloads,
    fetch: Callable[[list[str]], Awaitable[Iterable[tuple[str, bytes]]]],
) -> list[OutboxItem]:
    """OutboxItems for claimed rows whose fourth column is the event id: each event's JSON from
    `recent`, or else from `fetch(ids)` (the store's events table), oldest due first."""
    found: dict[str, bytes] = {}
    wanted: list[str] = []
    for row in rows:  # all taken from the cache before the first await: nothing evicts them
        event = row[3]
        if event not in found:
            payload = recent.get(event)
            if payload is None:
                wanted.append(event)
            else:
                found[event] = payload
    if wanted:
        found.update((event, bytes(payload)) for event, payload in await fetch(wanted))
    items = [item_from_row(row, found[row[3]]) for row in rows]
    return sorted(items, key=lambda i: (i.next_at, i.created_at))


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Store(ABC):
    """Task state, events, outbox, dead letters, message references and leases.

    `Store.open(url_or_path)` picks the backend: a `postgresql://` URL opens PostgreSQL (several
    replicas may share it), anything else is the path of a SQLite file (one process).
    """

    #: This process in leases and delivery claims (see bridge/lease.py).
    holder: str
    #: Seconds a claim of this process outlives it (renewed by `keep_claims` meanwhile).
    claim_timeout: float = CLAIM_TIMEOUT

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
        _OPEN_HOLDERS.discard(self.holder)
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

    # -- task state -------------------------------------------------------------------------

    @abstractmethod
    async def load_tasks(self, source: str, *, unfinished: bool = False) -> dict[str, TaskState]:
        """The task states of `source`; with `unfinished`, only those not finished (few: an index
        keeps this cheap for the leader's look at ids other replicas or `bridge track` added)."""

    @abstractmethod
    async def source_seen(self, source: str) -> bool: ...

    async def commit(
        self,
        source: str,
        states: Mapping[str, TaskState],
        events: Sequence[Event],
        deliveries: Sequence[Delivery],
        *,
        seen: bool = True,
        progress: Callable[[], None] | None = None,
    ) -> list[Event]:
        """Store one snapshot's changes: the events not stored yet with their deliveries, then the
        task states (and `seen`). Returns the new events, in the order given.

        Events go in transactions of up to COMMIT_CHUNK, each with its deliveries; the states go
        with the last. States never run ahead of the events they produced, so a crash between two
        transactions re-detects the rest, under the same event ids: nothing is lost and nothing is
        stored (or sent) twice. `progress()` is called after each transaction but the last that
        stored new deliveries, so sending starts before a large snapshot is all stored."""
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
        `deliveries` (all of them of `events`) of the new ones. Returns the new events."""

    # -- outbox -----------------------------------------------------------------------------

    @abstractmethod
    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due deliveries of `target`, oldest first, marked in flight so no other worker takes
        them."""

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
    async def dead_letters(self, limit: int = 100) -> list[OutboxItem]: ...

    @abstractmethod
    async def replay(self, ids: Sequence[str] | None) -> int:
        """Put dead letters back in the outbox (None: all of them), due now with fresh attempts
        and a fresh age, so `max_attempts` and `max_age` count from the replay."""

    @property
    @abstractmethod
    def history(self) -> History:
        """Read-only queries of what happened: events, tasks, deliveries, dead letters."""

    @abstractmethod
    async def recent_events(self, limit: int = 50) -> list[Event]: ...

    @abstractmethod
    async def recent_deliveries(self, limit: int = 50) -> list[OutboxRow]:
        """The latest deliveries in any state, newest first (status page)."""

    @abstractmethod
    async def outbox_depth(self) -> dict[str, int]:
        """Deliveries still waiting (pending or in flight) per target."""

    @abstractmethod
    async def dead_count(self) -> dict[str, int]:
        """Dead letters per target (metrics)."""

    @abstractmethod
    async def next_due(self, target: str) -> float | None:
        """When the next delivery of `target` can be claimed (None: nothing waits)."""

    @abstractmethod
    async def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete sent deliveries last updated before `before` (epoch seconds), then the events
        older than `before` that no delivery names any more: dead letters and deliveries still
        owed keep theirs. Task states stay (they stop a finished task from emitting again).
        `batch` rows per statement, each its own transaction. Returns (deliveries, events)."""

    # -- message references -----------------------------------------------------------------

    @abstractmethod
    async def get_message(self, target: str, key: str) -> str | None:
        """The reference a target kept for `key` (e.g. "source:task_id"): the chat message to
        edit for that task. None when it has none yet."""

    @abstractmethod
    async def put_message(self, target: str, key: str, ref: str) -> None:
        """Remember (or replace) the reference a target keeps for `key`."""

    # -- leases -----------------------------------------------------------------------------

    @abstractmethod
    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease `name` for `ttl` seconds if it is free, expired or already ours (then
        it is renewed). True when `holder` holds it now."""

    @abstractmethod
    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Extend our lease by `ttl` seconds from now; False when another holder has it."""

    @abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (if ours), so another process takes it at once."""

    @abstractmethod
    async def lease(self, name: str) -> tuple[str, float] | None:
        """(holder, seconds until it expires) of a lease held now; None when it is free."""

"""The outbox stage's records as the backends read them: rows into OutboxItems, and the JSON of
recently committed events kept in memory for the claims that follow (RecentPayloads).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from bridge.models import OutboxItem

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox item with its state, for the status page."""

    item: OutboxItem
    state: str
    updated_at: float


#: Rows deleted per statement (and transaction) by `Store.prune`: a large first prune never holds
#: the write lock for long.
PRUNE_BATCH = 5000


#: The columns `item_from_row` reads, from an outbox row `o` joined to its event `e`.
ITEM_COLUMNS = (
    'o.id, o.target, o.rule, e.json, o.title, o.body, o."group", o.attempts, o.created_at, '
    "o.next_at, o.last_error"
)


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

"""What happened, read back from the store: events by type, source, task and time with a cursor,
one event with its deliveries, one task, dead letters with their times. Read-only; for the API,
`bridge events`, `bridge explain --event` and `bridge dlq list`. One implementation over both
backends' SQL (they differ in placeholders and in how the outbox names its event)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from bridge.models import Event, TaskState
from bridge.store.rows import ITEM_COLUMNS as _ITEM
from bridge.store.rows import OutboxRow, item_from_row

#: The most rows one read returns.
MAX_LIMIT = 1000


class CursorError(ValueError):
    """A cursor this store did not hand out."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: `seq` orders events by arrival within the same `time`."""

    seq: int
    time: float
    event: Event

    @property
    def cursor(self) -> str:
        return encode_cursor(self.time, self.seq)


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Which events: every filter given must hold. `types` may end in `*` (task.*). `before` is
    a cursor (the page after it, newest first); `after` one to read forward from (oldest first)."""

    types: Sequence[str] = ()
    source: str | None = None
    task: str | None = None
    text: str | None = None  # found anywhere in the event's JSON (prompt, id, reason), any case
    since: float | None = None
    until: float | None = None
    before: str | None = None
    after: str | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class TaskView:
    source: str
    id: str
    state: TaskState | None
    events: list[StoredEvent]
    deliveries: list[OutboxRow]


#: What a cursor looks like: the row's time (epoch seconds) and its tie-breaker (an event's seq,
#: a delivery's id), e.g. `1796104429.924939_1234`. Plain text: it hides nothing and any string of
#: this shape is a position to page from.
CURSOR = r"^[0-9]{1,12}(\.[0-9]{1,9})?_[!-~]{1,200}$"
EVENT_CURSOR = r"^[0-9]{1,12}(\.[0-9]{1,9})?_[0-9]{1,18}$"
_CURSOR = re.compile(CURSOR)
_EVENT_CURSOR = re.compile(EVENT_CURSOR)


def encode_cursor(time: float, key: int | str) -> str:
    return f"{time!r}_{key}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    if not _CURSOR.fullmatch(cursor):
        raise CursorError("not a cursor: TIME_KEY as the previous page's next gave it")
    time, key = cursor.split("_", 1)
    return float(time), key


def _event_cursor(cursor: str) -> tuple[float, int]:
    if not _EVENT_CURSOR.fullmatch(cursor):
        raise CursorError("not an events cursor: TIME_SEQ as the previous page's next gave it")
    at, key = decode_cursor(cursor)
    return at, int(key)


def dead_cursor(row: OutboxRow) -> str:
    return encode_cursor(row.updated_at, row.item.id)


class History(Protocol):
    async def events(self, query: EventQuery) -> list[StoredEvent]: ...
    async def event(self, id: str) -> StoredEvent | None: ...
    async def deliveries(self, event_ids: Sequence[str]) -> list[OutboxRow]: ...
    async def task(self, source: str, id: str) -> TaskView: ...
    async def dead(
        self, target: str | None = None, limit: int = 100, before: str | None = None
    ) -> list[OutboxRow]: ...


Fetch = Callable[[str, Sequence[Any]], Awaitable[Sequence[Sequence[Any]]]]


class SqlHistory:
    """History over either backend: `fetch(sql, params)` runs a query with `?` placeholders (the
    PostgreSQL store numbers them `$n` itself). SQLite finds an event by `id_hash` of its id (its
    one index on events' ids, schema 7); PostgreSQL (id_hash None) by the id, its primary key."""

    def __init__(self, fetch: Fetch, *, id_hash: Callable[[str], int] | None = None) -> None:
        self._fetch = fetch
        self._hash = id_hash
        self._postgres = id_hash is None
        # SQLite's outbox refers to the event by seq (schema 7), PostgreSQL's by id.
        self._join = "e.id = o.event_id" if self._postgres else "e.seq = o.event_seq"

    async def _rows(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        return await self._fetch(sql, params)

    @staticmethod
    def _stored(row: Sequence[Any]) -> StoredEvent:
        return StoredEvent(int(row[0]), float(row[1]), Event.from_cloudevent(orjson.loads(row[2])))

    async def events(self, query: EventQuery) -> list[StoredEvent]:
        where: list[str] = []
        params: list[Any] = []
        if query.types:
            ors = []
            for name in query.types:
                if name.endswith("*"):
                    ors.append("type LIKE ? ESCAPE '!'")
                    prefix = name[:-1].replace("!", "!!").replace("%", "!%").replace("_", "!_")
                    params.append(prefix + "%")
                else:
                    ors.append("type = ?")
                    params.append(name)
            where.append("(" + " OR ".join(ors) + ")")
        for column, value in (("source", query.source), ("subject", query.task)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if query.text:
            # A scan of the events' JSON: fine for the status page's search over days of events;
            # instr/position rather than LIKE, so % and _ in the text are just characters.
            if self._postgres:
                where.append("position(lower(?) in lower(convert_from(json, 'UTF8'))) > 0")
            else:
                where.append("instr(lower(CAST(json AS TEXT)), lower(?)) > 0")
            params.append(query.text)
        if query.since is not None:
            where.append("time >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("time < ?")
            params.append(query.until)
        order = "DESC"
        if query.before is not None:
            where.append("(time < ? OR (time = ? AND seq < ?))")
            at, seq = _event_cursor(query.before)
            params += [at, at, seq]
        if query.after is not None:
            where.append("(time > ? OR (time = ? AND seq > ?))")
            at, seq = _event_cursor(query.after)
            params += [at, at, seq]
            order = "ASC"
        limit = max(1, min(query.limit, MAX_LIMIT))
        sql = (
            "SELECT seq, time, json FROM events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY time {order}, seq {order} LIMIT ?"
        )
        return [self._stored(r) for r in await self._rows(sql, [*params, limit])]

    async def event(self, id: str) -> StoredEvent | None:
        if self._hash is None:
            rows = await self._rows("SELECT seq, time, json FROM events WHERE id = ?", [id])
        else:
            rows = await self._rows(
                "SELECT seq, time, json FROM events WHERE h = ? AND id = ?", [self._hash(id), id]
            )
        return self._stored(rows[0]) if rows else None

    async def deliveries(self, event_ids: Sequence[str]) -> list[OutboxRow]:
        if not event_ids:
            return []
        ids = list(dict.fromkeys(event_ids))[:MAX_LIMIT]
        marks = ",".join("?" * len(ids))
        where = f"e.id IN ({marks})"
        params: list[Any] = [*ids]
        if self._hash is not None:
            where = f"e.h IN ({marks}) AND {where}"
            params = [*(self._hash(i) for i in ids), *ids]
        sql = (
            f"SELECT {_ITEM}, o.state, o.updated_at FROM outbox o JOIN events e ON {self._join} "
            f"WHERE {where} ORDER BY o.created_at, o.target"
        )
        return [OutboxRow(item_from_row(r), r[11], r[12]) for r in await self._rows(sql, params)]

    async def task(self, source: str, id: str) -> TaskView:
        rows = await self._rows(
            "SELECT status, progress, changed_at, stalled, missing, finished FROM tasks "
            "WHERE source = ? AND id = ?",
            [source, id],
        )
        state = None
        if rows:
            r = rows[0]
            state = TaskState(
                status=r[0],
                progress=r[1],
                changed_at=r[2],
                stalled=bool(r[3]),
                missing=r[4],
                finished=bool(r[5]),
            )
        events = await self.events(EventQuery(source=source, task=id, limit=MAX_LIMIT))
        events.reverse()  # oldest first: the task's story
        deliveries = await self.deliveries([e.event.id for e in events])
        return TaskView(source, id, state, events, deliveries)

    async def dead(
        self, target: str | None = None, limit: int = 100, before: str | None = None
    ) -> list[OutboxRow]:
        """Dead letters, newest first; `before` is `dead_cursor()` of the last row of a page."""
        where = ["o.state = 'dead'"]
        params: list[Any] = []
        if target is not None:
            where.append("o.target = ?")
            params.append(target)
        if before is not None:
            at, key = decode_cursor(before)
            where.append("(o.updated_at < ? OR (o.updated_at = ? AND o.id > ?))")
            params += [at, at, key]
        sql = (
            f"SELECT {_ITEM}, o.state, o.updated_at FROM outbox o JOIN events e ON {self._join} "
            f"WHERE {' AND '.join(where)} ORDER BY o.updated_at DESC, o.id LIMIT ?"
        )
        params.append(max(1, min(limit, MAX_LIMIT)))
        return [OutboxRow(item_from_row(r), r[11], r[12]) for r in await self._rows(sql, params)]

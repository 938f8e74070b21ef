"""The outbox stage, embedded: one SQLite file holds task state, events and the deliveries still
owed to targets, for one bridge process. A snapshot's new events and their deliveries are
written before anything is sent (in parts of COMMIT_CHUNK events, its states with the last, see
`Store.commit`); `deliver.py` then claims, sends and marks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiosqlite
import orjson

from bridge.diff import TaskState
from bridge.errors import StoreError
from bridge.models import Delivery, Event
from bridge.store.base import (
    PRUNE_BATCH,
    OutboxItem,
    OutboxRow,
    RecentPayloads,
    Store,
    chunks,
    claimed_items,
    event_json,
    holder_gone,
    item_from_row,
    log_recovered,
    new_holder,
)
from bridge.store.history import SqlHistory
from bridge.store.schema import SQLITE_MIGRATIONS

log = logging.getLogger("bridge.store")

PAGE_SIZE = 8192  # for new database files; see open()
_CHUNK = 500  # ids per `IN (...)`: far below SQLite's bound-variable limit

_ITEM_COLUMNS = (
    'o.id, o.target, o.rule, e.json, o.title, o.body, o."group", o.attempts, o.created_at, '
    "o.next_at, o.last_error"
)
_JOIN_EVENTS = "JOIN events e ON e.seq = o.event_seq"


def _marks(n: int) -> str:
    return ",".join("?" * n)


def id_hash(event_id: str) -> int:
    """`events.h`: a signed 64-bit hash of an event id, the key re-detection finds an event by
    (a third of the text id's size in the index; the id itself is compared after)."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SqliteStore(Store):
    """Task state, events, outbox and dead letters in one SQLite file (WAL mode), for one process.

    One connection, one writer: aiosqlite runs every statement on the connection's own thread, and
    a lock keeps each call's statements (one transaction) together.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # Coroutines share the one connection: a transaction must not interleave with another's
        # statements, and a read must not see another's uncommitted writes.
        self._lock = asyncio.Lock()
        self._payloads = RecentPayloads()
        # Rowids of the deliveries claimed and not settled yet: acks find their rows by rowid.
        self._rowids: dict[str, int] = {}
        self.holder = new_holder()

    @classmethod
    async def open(cls, url_or_path: str, *, readonly: bool = False) -> SqliteStore:
        """Open (creating or migrating) the database at `path`; `readonly`: open it read-only,
        as it is (its schema must be current). Nothing in it changes by being opened: several
        processes may use the file (`bridge run` and commands, or two `bridge run`)."""
        path = url_or_path
        target, uri = path, False
        if readonly:
            target, uri = f"file:{quote(path)}?mode=ro", True
        try:
            # Tried with plain sqlite3 first: aiosqlite leaves its thread behind when the
            # connect itself fails, and that thread later trips over a closed event loop.
            await asyncio.to_thread(lambda: sqlite3.connect(target, uri=uri).close())
            db = await aiosqlite.connect(target, isolation_level=None, uri=uri)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        if readonly:
            try:
                await db.execute("PRAGMA busy_timeout=5000")
                store = cls(db)
                await store._check_version(path)
            except BaseException as exc:
                await db.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot read the database {path}: {exc}") from exc
                raise
            return store
        try:
            # Before anything creates the file's first page (later it changes nothing): an event is
            # about 2 KB of JSON, and a 4 KiB page (SQLite's default) holds only one of them with
            # half the page left empty; at 8 KiB three fit. Storing a snapshot then writes about
            # 40% fewer pages, and the file (and each checkpoint) is that much smaller.
            await db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            await db.execute("PRAGMA journal_mode=WAL")
            # NORMAL, not FULL: in WAL mode a commit is in the OS once COMMIT returns, so a crash or
            # SIGKILL of this process loses nothing committed; only a power cut or kernel panic can
            # drop the last commits. FULL would fsync on every commit (one per snapshot and per ack
            # batch) for that case alone, and what it protects is re-created anyway: the upstream
            # still holds the tasks, and the deterministic event ids make re-detection store (and
            # send) each change under the same id.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            # Checkpoint every ~32 MiB of WAL instead of SQLite's 4 MiB: the two fsyncs of a
            # checkpoint come ten times less often under a burst of events.
            await db.execute("PRAGMA wal_autocheckpoint=8000")
            await db.create_function("id_hash", 1, id_hash, deterministic=True)  # migrations
            store = cls(db)
            await store._migrate(path)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open the database {path}: {exc}") from exc
            raise
        return store

    async def _version(self, path: str) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"the database {path} has schema version {version}, newer than this bridge "
                f"knows ({len(SQLITE_MIGRATIONS)}); upgrade the bridge"
            )
        return version

    async def _check_version(self, path: str) -> None:
        """For a read-only open: the schema must be this bridge's."""
        if await self._version(path) != len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"the database {path} has an older schema; `bridge run` upgrades it at start"
            )

    async def _migrate(self, path: str) -> None:
        version = await self._version(path)
        if version == len(SQLITE_MIGRATIONS):
            return
        if version:
            log.info(
                "database %s: upgrading from schema version %d to %d (once; a large file takes "
                "a while: about 15 s per 100,000 events)",
                path,
                version,
                len(SQLITE_MIGRATIONS),
            )
        # Foreign keys off while tables are rebuilt (SQLite's documented procedure; the pragma
        # does nothing inside a transaction), checked once everything is applied.
        await self._db.execute("PRAGMA foreign_keys=OFF")
        for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
            # executescript commits on its own, so the version bump rides inside the script.
            await self._db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        await self._db.execute("PRAGMA foreign_keys=ON")
        broken = await self._db.execute_fetchall("PRAGMA foreign_key_check")
        if broken:
            raise StoreError(f"the database {path} failed its foreign key check after upgrading")

    async def _close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[None]:
        """One write transaction; rolled back on any error, cancellation included."""
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # COMMIT may have run before a cancel
                    await self._db.execute("ROLLBACK")
                raise

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement, in a transaction of its own, in one trip to the database thread."""
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    # -- task state -------------------------------------------------------------------------

    async def load_tasks(self, source: str, *, unfinished: bool = False) -> dict[str, TaskState]:
        sql = (
            "SELECT id, status, progress, changed_at, stalled, missing, finished "
            "FROM tasks WHERE source = ?" + (" AND finished = 0" if unfinished else "")
        )
        rows = await self._fetch(sql, (source,))
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
        rows = await self._fetch("SELECT seen FROM sources WHERE name = ?", (source,))
        return bool(rows and rows[0][0])

    async def _commit(
        self,
        source: str,
        states: Mapping[str, TaskState],
        events: Sequence[Event],
        deliveries: Sequence[Delivery],
        *,
        seen: bool,
    ) -> list[Event]:
        now = time.time()
        candidates: dict[str, Event] = {e.id: e for e in events}
        db = self._db
        async with self._tx():
            known: set[str] = set()
            hashes = {e.id: id_hash(e.id) for e in candidates.values()}
            for chunk in chunks(list(hashes.values()), _CHUNK):
                sql = f"SELECT id FROM events WHERE h IN ({_marks(len(chunk))})"
                known.update(r[0] for r in await db.execute_fetchall(sql, chunk))
            new = [e for e in candidates.values() if e.id not in known]
            if states:
                await db.executemany(
                    "INSERT INTO tasks (source, id, status, progress, changed_at, stalled, "
                    "missing, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (source, id) DO UPDATE SET status = excluded.status, "
                    "progress = excluded.progress, changed_at = excluded.changed_at, "
                    "stalled = excluded.stalled, missing = excluded.missing, "
                    "finished = excluded.finished",
                    [
                        (
                            source,
                            task_id,
                            s.status,
                            s.progress,
                            s.changed_at,
                            int(s.stalled),
                            s.missing,
                            int(s.finished),
                        )
                        for task_id, s in states.items()
                    ],
                )
            event_rows = [
                (e.id, e.type, e.source, e.subject, e.time.timestamp(), event_json(e), hashes[e.id])
                for e in new
            ]
            if event_rows:
                # Only events not stored yet (looked up just above, in this transaction).
                await db.executemany(
                    "INSERT INTO events (id, type, source, subject, time, json, h) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    event_rows,
                )
            new_ids = {e.id for e in new}
            rows = [
                (
                    d.id,
                    d.target,
                    d.rule,
                    hashes[d.event.id],
                    d.event.id,
                    d.title,
                    d.body,
                    d.group,
                    now,
                    d.not_before.timestamp() if d.not_before else now,
                    now,
                )
                for d in deliveries
                if d.event.id in new_ids
            ]
            if rows:
                # Only the new events' deliveries: none of them can be stored already.
                await db.executemany(
                    "INSERT INTO outbox (id, target, rule, event_seq, title, body, "
                    '"group", created_at, next_at, updated_at) '
                    "VALUES (?, ?, ?, (SELECT seq FROM events WHERE h = ? AND id = ?), "
                    "?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if seen:
                await db.execute(
                    "INSERT INTO sources (name, seen) VALUES (?, 1) "
                    "ON CONFLICT (name) DO UPDATE SET seen = 1",
                    (source,),
                )
        for row in event_rows:
            self._payloads.put(row[0], row[5])
        return new

    # -- outbox -----------------------------------------------------------------------------

    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due pending deliveries of `target`, oldest first, marked in flight by this holder so
        no other worker (or process) takes them. A crash leaves them in flight until `recover`
        in the next process that delivers finds their holder gone or their claim expired."""
        # One statement is one transaction and one trip to the database thread: the hot path.
        # The events' JSON comes from RecentPayloads when this process just committed them.
        sql = (
            "UPDATE outbox SET state = 'inflight', claimed_by = ?, claimed_until = ? "
            "WHERE rowid IN ("
            "SELECT rowid FROM outbox WHERE target = ? AND state = 'pending' AND next_at <= ? "
            "ORDER BY next_at LIMIT ?) RETURNING id, target, rule, "
            "(SELECT id FROM events WHERE seq = outbox.event_seq), "
            'title, body, "group", attempts, created_at, next_at, last_error, rowid'
        )
        until = time.time() + self.claim_timeout
        rows = await self._fetch(sql, (self.holder, until, target, now, limit))
        self._rowids.update((r[0], r[11]) for r in rows)
        return await claimed_items(rows, self._payloads, self._event_json)

    async def _event_json(self, ids: Sequence[str]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for chunk in chunks(ids, _CHUNK):
            sql = f"SELECT id, json FROM events WHERE h IN ({_marks(len(chunk))})"
            wanted = set(chunk)
            rows = await self._fetch(sql, [id_hash(i) for i in chunk])
            out.extend((r[0], r[1]) for r in rows if r[0] in wanted)
        return out

    async def release(self, ids: Sequence[str]) -> None:
        """Hand claimed deliveries back without counting an attempt (shutdown)."""
        await self._update_ids(
            "UPDATE outbox SET state = 'pending', claimed_by = NULL WHERE state = 'inflight' "
            "AND claimed_by = ? AND rowid IN",
            (self.holder,),
            ids,
        )

    async def renew_claims(self) -> None:
        await self._fetch(
            "UPDATE outbox SET claimed_until = ? WHERE state = 'inflight' AND claimed_by = ?",
            (time.time() + self.claim_timeout, self.holder),
        )

    async def recover(self) -> int:
        """Claims of holders that are gone or that expired (a holder stopped renewing them; or
        claimed by a bridge before claims named their holder) go back to pending."""
        rows = await self._fetch(
            "SELECT DISTINCT claimed_by FROM outbox WHERE state = 'inflight' "
            "UNION SELECT holder FROM leases"
        )
        gone = [r[0] for r in rows if r[0] is not None and holder_gone(r[0])]
        async with self._tx():
            async with self._db.execute(
                "UPDATE outbox SET state = 'pending', claimed_by = NULL WHERE state = 'inflight' "
                "AND (claimed_by IS NULL OR claimed_until IS NULL OR claimed_until < ? "
                f"OR claimed_by IN ({_marks(len(gone))}))",
                (time.time(), *gone),
            ) as cur:
                count = int(cur.rowcount)
            if gone:
                await self._db.execute(
                    f"DELETE FROM leases WHERE holder IN ({_marks(len(gone))})", gone
                )
        log_recovered(count, gone)
        return count

    async def mark_sent(self, ids: Sequence[str]) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'sent', attempts = attempts + 1, updated_at = ?, "
            "last_error = NULL WHERE rowid IN",
            (time.time(),),
            ids,
        )

    async def mark_retry(self, id: str, next_at: float, error: str) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'pending', attempts = attempts + 1, next_at = ?, "
            "last_error = ?, updated_at = ? WHERE rowid IN",
            (next_at, error, time.time()),
            [id],
        )

    async def mark_dead(self, id: str, error: str) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?, "
            "updated_at = ? WHERE rowid IN",
            (error, time.time()),
            [id],
        )

    async def _rowids_of(self, ids: Sequence[str]) -> list[int]:
        """The rowids of deliveries named by id: remembered from their claim, or else looked up
        by their event and target (the id is "{event id}:{target}"; both are indexed)."""
        found: list[int] = []
        for id in ids:
            rowid = self._rowids.pop(id, None)
            if rowid is None:
                event, _, target = id.partition(":")
                rows = await self._fetch(
                    "SELECT o.rowid FROM outbox o JOIN events e ON e.seq = o.event_seq "
                    "WHERE e.h = ? AND e.id = ? AND o.target = ?",
                    (id_hash(event), event, target),
                )
                found.extend(r[0] for r in rows)
            else:
                found.append(rowid)
        return found

    async def abandon(self, targets: Collection[str]) -> dict[str, int]:
        known = list(targets)
        rows = await self._fetch(
            "UPDATE outbox SET state = 'dead', last_error = 'target ' || target || "
            "' is no longer in the config', updated_at = ? WHERE state = 'pending' "
            f"AND target NOT IN ({_marks(len(known))}) RETURNING target",
            (time.time(), *known),
        )
        return dict(Counter(r[0] for r in rows))

    async def _update_ids(self, sql: str, params: tuple[Any, ...], ids: Sequence[str]) -> None:
        """`sql` ends in `rowid IN`; run it for the deliveries `ids` names: one statement when
        they fit in one."""
        rowids = await self._rowids_of(ids)
        if len(rowids) <= _CHUNK:
            if rowids:
                await self._fetch(f"{sql} ({_marks(len(rowids))})", (*params, *rowids))
            return
        async with self._tx():
            for chunk in chunks(rowids, _CHUNK):
                await self._db.execute(f"{sql} ({_marks(len(chunk))})", (*params, *chunk))

    async def dead_letters(self, limit: int = 100) -> list[OutboxItem]:
        sql = (
            f"SELECT {_ITEM_COLUMNS} FROM outbox o {_JOIN_EVENTS} "
            "WHERE o.state = 'dead' ORDER BY o.updated_at DESC, o.id LIMIT ?"
        )
        return [item_from_row(r) for r in await self._fetch(sql, (limit,))]

    async def replay(self, ids: Sequence[str] | None) -> int:
        """Put dead letters back in the outbox (None: all of them), due now with fresh attempts
        and a fresh age, so `max_attempts` and `max_age` count from the replay."""
        now = time.time()
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, next_at = ?, created_at = ?, "
            "updated_at = ? WHERE state = 'dead'"
        )
        db = self._db
        async with self._tx():
            if ids is None:
                async with db.execute(sql, (now, now, now)) as cur:
                    count = cur.rowcount
            else:
                count = 0
                for chunk in chunks(list(ids), _CHUNK):
                    chunk_sql = f"{sql} AND id IN ({_marks(len(chunk))})"
                    async with db.execute(chunk_sql, (now, now, now, *chunk)) as cur:
                        count += cur.rowcount
        return count

    @property
    def history(self) -> SqlHistory:
        return SqlHistory(self._fetch, id_hash=id_hash)

    async def recent_events(self, limit: int = 50) -> list[Event]:
        sql = "SELECT json FROM events ORDER BY time DESC, rowid DESC LIMIT ?"
        return [Event.from_cloudevent(orjson.loads(r[0])) for r in await self._fetch(sql, (limit,))]

    async def recent_deliveries(self, limit: int = 50) -> list[OutboxRow]:
        """The latest deliveries in any state, newest first (status page)."""
        sql = (
            f"SELECT {_ITEM_COLUMNS}, o.state, o.updated_at FROM outbox o "
            f"{_JOIN_EVENTS} ORDER BY o.updated_at DESC, o.id LIMIT ?"
        )
        return [OutboxRow(item_from_row(r), r[11], r[12]) for r in await self._fetch(sql, (limit,))]

    async def outbox_depth(self) -> dict[str, int]:
        """Deliveries still waiting (pending or in flight) per target."""
        sql = (
            "SELECT target, COUNT(*) FROM outbox WHERE state IN ('pending', 'inflight') "
            "GROUP BY target"
        )
        return {r[0]: r[1] for r in await self._fetch(sql)}

    async def dead_count(self) -> dict[str, int]:
        """Dead letters per target (metrics)."""
        sql = "SELECT target, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY target"
        return {r[0]: r[1] for r in await self._fetch(sql)}

    # -- retention --------------------------------------------------------------------------

    async def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete sent deliveries last updated before `before`, then the events older than
        `before` that no delivery names; `batch` rows per transaction, so the watchers and the
        deliverer get the connection between batches. Returns (deliveries, events)."""
        deliveries = 0
        while True:
            count = await self._delete(
                "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox "
                "WHERE state = 'sent' AND updated_at < ? LIMIT ?)",
                (before, batch),
            )
            deliveries += count
            if count < batch:
                break
        # Events are walked once in (time, rowid) order, a window of `batch` at a time: the old
        # ones a dead letter keeps are passed over rather than looked at again by every batch.
        events = 0
        low: tuple[float, int] = (float("-inf"), 0)
        while True:
            rows = await self._fetch(
                "SELECT time, rowid FROM events WHERE time < ? AND time >= ? "
                "AND (time > ? OR rowid > ?) ORDER BY time, rowid LIMIT 1 OFFSET ?",
                (before, low[0], low[0], low[1], batch - 1),
            )
            high: tuple[float, int] = (rows[0][0], rows[0][1]) if rows else (before, 2**62)
            events += await self._delete(
                "DELETE FROM events WHERE time < ? AND time >= ? AND (time > ? OR rowid > ?) "
                "AND time <= ? AND (time < ? OR rowid <= ?) "
                "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.event_seq = events.seq)",
                (before, low[0], low[0], low[1], high[0], high[0], high[1]),
            )
            if not rows:
                return deliveries, events
            low = high

    async def _delete(self, sql: str, params: Sequence[Any]) -> int:
        """One statement in a write transaction of its own; the rows it touched."""
        async with self._tx(), self._db.execute(sql, params) as cur:
            return int(cur.rowcount)

    # -- message references -----------------------------------------------------------------

    async def get_message(self, target: str, key: str) -> str | None:
        """The reference a target kept for `key` (e.g. "source:task_id"): the chat message to
        edit for that task. None when it has none yet."""
        sql = "SELECT ref FROM messages WHERE target = ? AND key = ?"
        rows = await self._fetch(sql, (target, key))
        return str(rows[0][0]) if rows else None

    async def put_message(self, target: str, key: str, ref: str) -> None:
        """Remember (or replace) the reference a target keeps for `key`."""
        await self._fetch(
            "INSERT INTO messages (target, key, ref, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (target, key) DO UPDATE SET ref = excluded.ref, "
            "updated_at = excluded.updated_at",
            (target, key, ref, time.time()),
        )

    async def next_due(self, target: str) -> float | None:
        sql = "SELECT MIN(next_at) FROM outbox WHERE target = ? AND state = 'pending'"
        rows = await self._fetch(sql, (target,))
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- leases -----------------------------------------------------------------------------

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        now = time.time()
        rows = await self._fetch(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at < ? RETURNING holder",
            (name, holder, now + ttl, now),
        )
        return bool(rows)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        rows = await self._fetch(
            "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? RETURNING 1",
            (time.time() + ttl, name, holder),
        )
        return bool(rows)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._fetch("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._fetch(
            "SELECT holder, expires_at FROM leases WHERE name = ? AND expires_at >= ?",
            (name, time.time()),
        )
        return (str(rows[0][0]), float(rows[0][1]) - time.time()) if rows else None

"""The outbox stage, embedded: one SQLite file holds task state, events, the deliveries still owed
to targets, leases and source health. A snapshot's new events and their deliveries are written
before anything is sent (in parts of COMMIT_CHUNK events, its states with the last, see
`Store.commit`); `deliver.py` then claims, sends and marks them (sqlite_outbox.py). Several
processes may open the file: commands beside `bridge run`, or two `bridge run` (as replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiosqlite

from bridge.errors import StoreError
from bridge.models import Delivery, Event, TaskState, event_json
from bridge.store.history import SqlHistory
from bridge.store.holders import new_holder
from bridge.store.retry import Retrier
from bridge.store.rows import PRUNE_BATCH, RecentPayloads, chunks
from bridge.store.schema import SQLITE_MIGRATIONS
from bridge.store.sqlite_outbox import CHUNK, SqliteOutbox, id_hash, marks

log = logging.getLogger("bridge.store")

T = TypeVar("T")

PAGE_SIZE = 8192  # for new database files; see open()

# sqlite3's primary result codes (the low byte of `sqlite_errorcode`) that trying again may cure,
# with what they mean for an operator. Everything else (corrupt, not a database, read-only,
# constraint, an SQL error) is not retried.
_TRANSIENT = {
    sqlite3.SQLITE_BUSY: "busy",
    sqlite3.SQLITE_LOCKED: "locked",
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_NOMEM: "out of memory",
    sqlite3.SQLITE_PROTOCOL: "locked",
}
_PERMANENT = {
    sqlite3.SQLITE_CORRUPT: "corrupt",
    sqlite3.SQLITE_NOTADB: "corrupt",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_CANTOPEN: "cannot open",
}


def translate(exc: sqlite3.Error, path: str) -> StoreError:
    """The store's boundary: a sqlite3 error as a StoreError, transient or not."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _TRANSIENT:
        return StoreError(f"database {path}: {exc}", transient=True, kind=_TRANSIENT[primary])
    return StoreError(f"database {path}: {exc}", kind=_PERMANENT.get(primary or 0, "error"))


class SqliteStore(SqliteOutbox):
    """Task state, events, outbox, dead letters and leases in one SQLite file (WAL mode).

    One connection per process: aiosqlite runs every statement on the connection's own thread,
    and a lock keeps each call's statements (one transaction) together. Other processes on the
    file wait for the write lock (busy_timeout), then the retry policy (retry.py).
    """

    _JOIN_EVENTS = "JOIN events e ON e.seq = o.event_seq"
    _UNFINISHED = " AND finished = 0"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self._db = db
        self._path = path
        # Coroutines share the one connection: a transaction must not interleave with another's
        # statements, and a read must not see another's uncommitted writes.
        self._lock = asyncio.Lock()
        self._payloads = RecentPayloads()
        self._rowids = {}
        self.holder = new_holder()
        self.retrier = Retrier(path)

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
            async with _closed_on_error(db, f"cannot read the database {path}"):
                await db.execute("PRAGMA busy_timeout=5000")
                store = cls(db, path)
                await store._check_version()
            return store
        async with _closed_on_error(db, f"cannot open the database {path}"):
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
            store = cls(db, path)
            await store._migrate()
        return store

    async def _version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"the database {self._path} has schema version {version}, newer than this bridge "
                f"knows ({len(SQLITE_MIGRATIONS)}); upgrade the bridge"
            )
        return version

    async def _check_version(self) -> None:
        """For a read-only open: the schema must be this bridge's."""
        if await self._version() != len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"the database {self._path} has an older schema; `bridge run` upgrades it at start"
            )

    async def _migrate(self) -> None:
        path = self._path
        version = await self._version()
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

    @property
    def history(self) -> SqlHistory:
        return SqlHistory(lambda sql, params: self._fetch(sql, *params), id_hash=id_hash)

    async def _close(self) -> None:
        await self._db.close()

    async def _run(
        self, call: Callable[[aiosqlite.Connection], Awaitable[T]], *, write: bool = True
    ) -> T:
        async def once() -> T:
            async with self._lock:
                try:
                    if write:
                        await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        result = await call(self._db)
                        if write:
                            await self._db.execute("COMMIT")
                    except BaseException:
                        if write:  # COMMIT may have run before a cancel
                            with contextlib.suppress(sqlite3.Error):
                                await self._db.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    raise translate(exc, self._path) from exc
                return result

        return await self.retrier.run(once)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """One statement, in a transaction of its own, in one trip to the database thread."""

        async def fetch(db: aiosqlite.Connection) -> list[Any]:
            return list(await db.execute_fetchall(sql, args))

        return await self._run(fetch, write=False)

    # -- snapshots --------------------------------------------------------------------------

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

        async def run(db: aiosqlite.Connection) -> tuple[list[Event], list[tuple[Any, ...]]]:
            known: set[str] = set()
            hashes = {e.id: id_hash(e.id) for e in candidates.values()}
            for chunk in chunks(list(hashes.values()), CHUNK):
                sql = f"SELECT id FROM events WHERE h IN ({marks(len(chunk))})"
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
                    "pending" if d.error is None else "dead",
                    d.error,
                )
                for d in deliveries
                if d.event.id in new_ids
            ]
            if rows:
                # Only the new events' deliveries: none of them can be stored already. One whose
                # template failed is a dead letter from the start, in this same transaction.
                await db.executemany(
                    "INSERT INTO outbox (id, target, rule, event_seq, title, body, "
                    '"group", created_at, next_at, updated_at, state, last_error) '
                    "VALUES (?, ?, ?, (SELECT seq FROM events WHERE h = ? AND id = ?), "
                    "?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if seen:
                await db.execute(
                    "INSERT INTO sources (name, seen) VALUES (?, 1) "
                    "ON CONFLICT (name) DO UPDATE SET seen = 1",
                    (source,),
                )
            return new, event_rows

        new, event_rows = await self._run(run)
        for row in event_rows:
            self._payloads.put(row[0], row[5])
        return new

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
                before,
                batch,
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
                before,
                low[0],
                low[0],
                low[1],
                batch - 1,
            )
            high: tuple[float, int] = (rows[0][0], rows[0][1]) if rows else (before, 2**62)
            events += await self._delete(
                "DELETE FROM events WHERE time < ? AND time >= ? AND (time > ? OR rowid > ?) "
                "AND time <= ? AND (time < ? OR rowid <= ?) "
                "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.event_seq = events.seq)",
                before,
                low[0],
                low[0],
                low[1],
                high[0],
                high[0],
                high[1],
            )
            if not rows:
                return deliveries, events
            low = high

    async def _delete(self, sql: str, *args: Any) -> int:
        """One statement in a write transaction of its own; the rows it touched."""

        async def run(db: aiosqlite.Connection) -> int:
            async with db.execute(sql, args) as cur:
                return int(cur.rowcount)

        return await self._run(run)

    # -- leases (this machine's clock: the processes on one file share it) ------------------

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        now = time.time()
        rows = await self._fetch(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at < ? RETURNING holder",
            name,
            holder,
            now + ttl,
            now,
        )
        return bool(rows)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        rows = await self._fetch(
            "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? RETURNING 1",
            time.time() + ttl,
            name,
            holder,
        )
        return bool(rows)

    async def lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._fetch(
            "SELECT holder, expires_at FROM leases WHERE name = ? AND expires_at >= ?",
            name,
            time.time(),
        )
        return (str(rows[0][0]), float(rows[0][1]) - time.time()) if rows else None


@contextlib.asynccontextmanager
async def _closed_on_error(db: aiosqlite.Connection, doing: str) -> AsyncIterator[None]:
    """Setting up a just-opened connection: on any failure close it; a database error is a
    `StoreError` that says what was being done."""
    try:
        yield
    except BaseException as exc:
        await db.close()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{doing}: {exc}") from exc
        raise

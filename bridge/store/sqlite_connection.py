"""The outbox stage, embedded: the SQLite file opened (its pragmas, its migrations) and the one
connection every call of the SQLite store runs on, one transaction per call, retried while it
fails transiently. sqlite.py puts the store together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiosqlite

from bridge.errors import StoreError
from bridge.store.base import Store
from bridge.store.history import SqlHistory
from bridge.store.schema import SQLITE_MIGRATIONS
from bridge.store.sqlite_errors import translate

log = logging.getLogger("bridge.store")

T = TypeVar("T")

PAGE_SIZE = 8192  # for new database files; see open()
CHUNK = 500  # ids per `IN (...)`: far below SQLite's bound-variable limit


def marks(n: int) -> str:
    return ",".join("?" * n)


def id_hash(event_id: str) -> int:
    """`events.h`: a signed 64-bit hash of an event id, the key re-detection finds an event by
    (a third of the text id's size in the index; the id itself is compared after)."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SqliteConnection(Store):
    """One SQLite file (WAL mode) and this process's one connection to it.

    aiosqlite runs every statement on the connection's own thread, and a lock keeps each call's
    statements (one transaction) together. Other processes on the file wait for the write lock
    (busy_timeout), then the retry policy (retry.py).
    """

    _JOIN_EVENTS = "JOIN events e ON e.seq = o.event_seq"
    _UNFINISHED = " AND finished = 0"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        super().__init__(path)
        self._db = db
        self._path = path
        # Coroutines share the one connection: a transaction must not interleave with another's
        # statements, and a read must not see another's uncommitted writes.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url_or_path: str, *, readonly: bool = False) -> Self:
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
        """`call(db)` in one transaction (`write`: BEGIN IMMEDIATE ... COMMIT), retried while it
        fails transiently; sqlite3 errors come out as StoreError."""

        async def once() -> T:
            async with self._lock:
                try:
                    try:
                        if write:
                            await self._db.execute("BEGIN IMMEDIATE")
                        result = await call(self._db)
                        if write:
                            await self._db.execute("COMMIT")
                    except BaseException:
                        # A cancel that lands while BEGIN waits (for another writer's lock) does
                        # not stop it: aiosqlite's thread still begins the transaction, and the
                        # next BEGIN would fail for good. This ROLLBACK, queued behind it on the
                        # same thread, ends it; after a failed BEGIN or a COMMIT that ran, there
                        # is nothing to roll back and its error is ignored.
                        if write:
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

"""The outbox stage, shared: the PostgreSQL database connected (a pool, the bridge's own URL
options, the migrations one replica at a time) and the one way every call of the PostgreSQL store
runs: one transaction on a pooled connection, again on a fresh one while it fails transiently.
postgres.py puts the store together.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from bridge.errors import StoreError
from bridge.store.base import Store
from bridge.store.history import SqlHistory
from bridge.store.holders import CLAIM_TIMEOUT
from bridge.store.postgres_errors import translate
from bridge.store.schema import POSTGRES_MIGRATIONS

log = logging.getLogger("bridge.store")

T = TypeVar("T")

CONNECT_FOR = 30.0  # seconds a database that does not answer yet is tried again at start
POOL_SIZE = 10
_MIGRATION_LOCK = 0x6D6A627269646765  # pg_advisory_xact_lock key: "mjbridge"


@functools.lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """The shared queries' `?` placeholders as PostgreSQL's $1, $2, ..."""
    counter = iter(range(1, 1 << 16))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _options(url: str) -> tuple[str, float, float]:
    """The URL for asyncpg without the bridge's own query options, `claim_timeout` and
    `connect_for`."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {"claim_timeout": CLAIM_TIMEOUT, "connect_for": CONNECT_FOR}
    rest = []
    for key, value in query:
        if key in ours:
            try:
                ours[key] = float(value)
            except ValueError:
                raise StoreError(f"{key} must be seconds, not {value!r}") from None
            if ours[key] < 0 or (key == "claim_timeout" and ours[key] == 0):
                raise StoreError(f"{key} must be positive")
        else:
            rest.append((key, value))
    query_less = urlunsplit(parts._replace(query=urlencode(rest)))
    return query_less, ours["claim_timeout"], ours["connect_for"]


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql://{user}{host}{port}{parts.path}"


def rows_touched(status: str) -> int:
    """Rows touched, from a command status such as "UPDATE 3"."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresConnection(Store):
    """A pool of connections to the PostgreSQL database replicas share.

    Every call is one transaction, retried on a fresh connection while the server is briefly
    unreachable (each call is safe to repeat: ids make inserts idempotent).
    """

    _JOIN_EVENTS = "JOIN events e ON e.id = o.event_id"
    _UNFINISHED = " AND NOT finished"

    def __init__(self, pool: Any, where: str, claim_timeout: float) -> None:
        super().__init__(where)
        self._pool = pool
        self._where = where
        self.claim_timeout = claim_timeout

    @classmethod
    async def open(cls, url_or_path: str, *, readonly: bool = False) -> Self:
        """Connect and apply the migrations not applied yet (one replica at a time); `readonly`:
        read-only transactions and no migrations (the schema must be current). Claims of
        replicas that died expire on their own (see `claim`, `recover`)."""
        url, claim_timeout, connect_for = _options(url_or_path)
        settings = {"default_transaction_read_only": "on"} if readonly else {}
        where = describe(url)
        # Replicas often start with (or before) their database: a server that is not up yet is
        # tried again for `connect_for` seconds; a refusal (bad password, no such database) is not.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError)),
            stop=stop_after_delay(connect_for),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            before_sleep=lambda state: log.warning(
                "database %s not reachable yet (%s); trying again",
                where,
                state.outcome and state.outcome.exception(),
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    pool = await asyncpg.create_pool(
                        url,
                        min_size=1,
                        max_size=POOL_SIZE,
                        command_timeout=60,
                        server_settings=settings,
                    )
        except (asyncpg.PostgresError, OSError, ValueError) as exc:
            raise StoreError(f"cannot open the database {where}: {exc}") from None
        store = cls(pool, where, claim_timeout)
        try:
            await store._migrate(apply=not readonly)
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self, *, apply: bool) -> None:
        async def run(conn: Any) -> None:
            if not apply:
                if await conn.fetchval("SELECT to_regclass('bridge_schema')") is None:
                    raise StoreError(
                        f"the database {self._where} holds no bridge tables (is it the one "
                        "`bridge run --db` uses? `bridge run` creates them at its first start)"
                    )
                version = await conn.fetchval("SELECT max(version) FROM bridge_schema")
                if version != len(POSTGRES_MIGRATIONS):
                    raise StoreError(
                        f"the database {self._where} has schema version {version or 0}, not "
                        f"{len(POSTGRES_MIGRATIONS)}; `bridge run` upgrades it at start"
                    )
                return
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS bridge_schema (version INTEGER NOT NULL)"
                )
                version = await conn.fetchval("SELECT max(version) FROM bridge_schema") or 0
                if version > len(POSTGRES_MIGRATIONS):
                    raise StoreError(
                        f"the database {self._where} has schema version {version}, newer than "
                        f"this bridge knows ({len(POSTGRES_MIGRATIONS)}); upgrade the bridge"
                    )
                for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
                    await conn.execute(script)
                    await conn.execute("DELETE FROM bridge_schema")
                    await conn.execute("INSERT INTO bridge_schema (version) VALUES ($1)", number)
                    log.info("database %s: schema version %d applied", self._where, number)

        await self._run(run)

    @property
    def history(self) -> SqlHistory:
        return SqlHistory(lambda sql, params: self._fetch(sql, *params))

    async def _close(self) -> None:
        await self._pool.close()

    async def _run(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(connection)` on a pooled connection, one transaction; again on a fresh one
        while it fails transiently (retry.py). Every call is safe to repeat: ids make inserts
        idempotent, and a call that failed committed nothing."""

        async def once() -> T:
            try:
                async with self._pool.acquire() as conn:
                    return await call(conn)
            except StoreError:
                raise
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                raise translate(exc, self._where) from exc

        return await self.retrier.run(once)

    async def _execute(self, sql: str, *args: Any) -> str:
        """One statement in a transaction of its own; its command status ("UPDATE 3")."""

        async def call(conn: Any) -> str:
            return str(await conn.execute(sql, *args))

        return await self._run(call)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if "?" in sql:
            sql = numbered(sql)

        async def call(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        return await self._run(call)

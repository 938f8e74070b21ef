"""The outbox stage, shared: PostgreSQL holds task state, events and deliveries for several
bridge replicas. Deliveries are claimed with `FOR UPDATE SKIP LOCKED` and carry a visibility
timeout (`claimed_until`), renewed while the claiming replica lives; leases say who polls a source.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from bridge.errors import StoreError
from bridge.models import Delivery, Event, TaskState, event_json
from bridge.store.history import SqlHistory
from bridge.store.holders import CLAIM_TIMEOUT, new_holder
from bridge.store.postgres_outbox import PostgresOutbox, rows_touched
from bridge.store.retry import Retrier
from bridge.store.rows import PRUNE_BATCH, RecentPayloads
from bridge.store.schema import POSTGRES_MIGRATIONS

log = logging.getLogger("bridge.store")

T = TypeVar("T")

CONNECT_FOR = 30.0  # seconds a database that does not answer yet is tried again at start
POOL_SIZE = 10
_MIGRATION_LOCK = 0x6D6A627269646765  # pg_advisory_xact_lock key: "mjbridge"

# SQLSTATE classes and codes that trying again may cure, with what they mean for an operator
# (https://www.postgresql.org/docs/current/errcodes-appendix.html). The rest is not retried.
_TRANSIENT_STATES = {
    "08": "connection lost",  # connection exception
    "53": "out of resources",  # insufficient resources (53100: disk full)
    "57P01": "connection lost",  # admin shutdown
    "57P02": "connection lost",  # crash shutdown
    "57P03": "starting up",  # cannot connect now
    "40001": "conflict",  # serialization failure: two transactions crossed
    "40P01": "conflict",  # deadlock detected
    "55P03": "locked",  # lock not available
}


def translate(exc: BaseException, where: str) -> StoreError:
    """The store's boundary: an asyncpg or connection error as a StoreError."""
    message = f"database {where}: {exc}"
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        kind = _TRANSIENT_STATES.get(state) or _TRANSIENT_STATES.get(state[:2])
        if state == "53100":
            kind = "disk full"
        return StoreError(message, transient=kind is not None, kind=kind or "error")
    if isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return StoreError(message, transient=True, kind="connection lost")
    return StoreError(message)


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


class PostgresStore(PostgresOutbox):
    """Task state, events, outbox, dead letters and leases in PostgreSQL, shared by replicas.

    A pool of connections; every call is one transaction, retried on a fresh connection while the
    server is briefly unreachable (each call is safe to repeat: ids make inserts idempotent).
    """

    _JOIN_EVENTS = "JOIN events e ON e.id = o.event_id"
    _UNFINISHED = " AND NOT finished"

    def __init__(self, pool: Any, where: str, claim_timeout: float) -> None:
        self._pool = pool
        self._where = where
        self.claim_timeout = claim_timeout
        self.holder = new_holder()
        self._held = set()
        self._payloads = RecentPayloads()
        self.retrier = Retrier(where)

    @classmethod
    async def open(cls, url_or_path: str, *, readonly: bool = False) -> PostgresStore:
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
        async def call(conn: Any) -> str:
            return str(await conn.execute(sql, *args))

        return await self._run(call)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if "?" in sql:
            sql = numbered(sql)

        async def call(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        return await self._run(call)

    # -- task state -------------------------------------------------------------------------

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
        event_rows = list({e.id: e for e in events}.values())
        task_rows = list(states.items())
        payloads = [event_json(e) for e in event_rows]

        async def call(conn: Any) -> set[str]:
            async with conn.transaction():
                if task_rows:
                    await conn.execute(
                        "INSERT INTO tasks (source, id, status, progress, changed_at, stalled, "
                        "missing, finished) SELECT $1, * FROM unnest($2::text[], $3::text[], "
                        "$4::int[], $5::float8[], $6::bool[], $7::int[], $8::bool[]) "
                        "ON CONFLICT (source, id) DO UPDATE SET status = excluded.status, "
                        "progress = excluded.progress, changed_at = excluded.changed_at, "
                        "stalled = excluded.stalled, missing = excluded.missing, "
                        "finished = excluded.finished",
                        source,
                        [t for t, _ in task_rows],
                        [s.status for _, s in task_rows],
                        [s.progress for _, s in task_rows],
                        [s.changed_at for _, s in task_rows],
                        [s.stalled for _, s in task_rows],
                        [s.missing for _, s in task_rows],
                        [s.finished for _, s in task_rows],
                    )
                new_ids: set[str] = set()
                if event_rows:
                    # RETURNING names only the rows inserted here: an event another replica
                    # stored first (even concurrently) is not new, and gets no deliveries.
                    rows = await conn.fetch(
                        "INSERT INTO events (id, type, source, subject, time, json) "
                        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                        "$5::float8[], $6::bytea[]) ON CONFLICT (id) DO NOTHING RETURNING id",
                        [e.id for e in event_rows],
                        [e.type for e in event_rows],
                        [e.source for e in event_rows],
                        [e.subject for e in event_rows],
                        [e.time.timestamp() for e in event_rows],
                        payloads,
                    )
                    new_ids = {r[0] for r in rows}
                owed = [d for d in deliveries if d.event.id in new_ids]
                if owed:
                    # A delivery whose template failed is a dead letter from the start, stored
                    # so in this same transaction.
                    await conn.execute(
                        'INSERT INTO outbox (id, target, rule, event_id, title, body, "group", '
                        "created_at, next_at, updated_at, state, last_error) SELECT u.id, "
                        "u.target, u.rule, u.event_id, u.title, u.body, u.g, $8, u.next_at, $8, "
                        "CASE WHEN u.error IS NULL THEN 'pending' ELSE 'dead' END, u.error "
                        "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
                        "$6::text[], $7::text[], $9::float8[], $10::text[]) "
                        "AS u(id, target, rule, event_id, title, body, g, next_at, error) "
                        "ON CONFLICT (id) DO NOTHING",
                        [d.id for d in owed],
                        [d.target for d in owed],
                        [d.rule for d in owed],
                        [d.event.id for d in owed],
                        [d.title for d in owed],
                        [d.body for d in owed],
                        [d.group for d in owed],
                        now,
                        [d.not_before.timestamp() if d.not_before else now for d in owed],
                        [d.error for d in owed],
                    )
                if seen:
                    await conn.execute(
                        "INSERT INTO sources (name, seen) VALUES ($1, true) "
                        "ON CONFLICT (name) DO UPDATE SET seen = true",
                        source,
                    )
                return new_ids

        new_ids = await self._run(call)
        for event, payload in zip(event_rows, payloads, strict=True):
            if event.id in new_ids:
                self._payloads.put(event.id, payload)
        return [e for e in event_rows if e.id in new_ids]

    # -- outbox -----------------------------------------------------------------------------

    # -- retention --------------------------------------------------------------------------

    async def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete sent deliveries last updated before `before`, then the events older than
        `before` that no delivery names; `batch` rows per statement, each its own transaction.
        Replicas may prune at once: rows another one is deleting are skipped, not waited for."""
        deliveries = 0
        while True:
            count = rows_touched(
                await self._execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'sent' "
                    "AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    before,
                    batch,
                )
            )
            deliveries += count
            if count < batch:
                break
        # Events are walked once in (time, seq) order, a window of `batch` at a time: the old
        # ones a dead letter keeps are passed over rather than looked at again by every batch.
        events = 0
        low: tuple[float, int] = (float("-inf"), 0)
        while True:
            rows = await self._fetch(
                "WITH batch AS (SELECT id, time, seq FROM events WHERE time < $1 "
                "AND (time, seq) > ($2::float8, $3::bigint) ORDER BY time, seq LIMIT $4), "
                "gone AS (DELETE FROM events e USING batch b WHERE e.id = b.id "
                "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id) RETURNING 1) "
                "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM batch), "
                "last.time, last.seq "
                "FROM (SELECT time, seq FROM batch ORDER BY time DESC, seq DESC LIMIT 1) last",
                before,
                low[0],
                low[1],
                batch,
            )
            if not rows:  # the window was empty: nothing was deleted either
                return deliveries, events
            gone, seen, last_time, last_seq = rows[0]
            events += gone
            if seen < batch:
                return deliveries, events
            low = (last_time, last_seq)

    # -- message references -----------------------------------------------------------------

    # -- leases (the server's clock: replicas' clocks need not agree) -----------------------

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        rows = await self._fetch(
            "INSERT INTO leases (name, holder, expires_at) "
            "VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3::float8)) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at < clock_timestamp() "
            "RETURNING holder",
            name,
            holder,
            ttl,
        )
        return bool(rows)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        rows = await self._fetch(
            "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $3::float8) "
            "WHERE name = $1 AND holder = $2 RETURNING 1",
            name,
            holder,
            ttl,
        )
        return bool(rows)

    async def lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._fetch(
            "SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 "
            "FROM leases WHERE name = $1 AND expires_at >= clock_timestamp()",
            name,
        )
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

"""The outbox stage, shared: PostgreSQL holds task state, events and deliveries for several
bridge replicas. Deliveries are claimed with `FOR UPDATE SKIP LOCKED` and carry a visibility
timeout (`claimed_until`), renewed while the claiming replica lives; leases say who polls a source.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from bridge.diff import TaskState
from bridge.errors import StoreError
from bridge.models import Delivery, Event
from bridge.store.base import (
    CLAIM_TIMEOUT,
    PRUNE_BATCH,
    OutboxItem,
    OutboxRow,
    RecentPayloads,
    Store,
    claimed_items,
    event_json,
    holder_gone,
    item_from_row,
    log_recovered,
    new_holder,
)
from bridge.store.history import SqlHistory
from bridge.store.schema import POSTGRES_MIGRATIONS

log = logging.getLogger("bridge.store")

T = TypeVar("T")

CONNECT_FOR = 30.0  # seconds a database that does not answer yet is tried again at start
POOL_SIZE = 10
RETRY_FOR = 15.0  # seconds an operation is retried while the server is unreachable
_MIGRATION_LOCK = 0x6D6A627269646765  # pg_advisory_xact_lock key: "mjbridge"
_NOW = "extract(epoch FROM clock_timestamp())"

# The server went away or is restarting: the same call is tried again on a fresh connection.
_GONE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    ConnectionError,
    OSError,
)
# Two transactions crossed (e.g. an ack and a claim renewal on the same rows): one is retried.
_CROSSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

_ITEM = (
    'o.id, o.target, o.rule, e.json, o.title, o.body, o."group", o.attempts, o.created_at, '
    "o.next_at, o.last_error"
)


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


def _count(status: str) -> int:
    """Rows touched, from a command status such as "UPDATE 3"."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresStore(Store):
    """Task state, events, outbox, dead letters and leases in PostgreSQL, shared by replicas.

    A pool of connections; every call is one transaction, retried on a fresh connection while the
    server is briefly unreachable (each call is safe to repeat: ids make inserts idempotent).
    """

    def __init__(self, pool: Any, where: str, claim_timeout: float) -> None:
        self._pool = pool
        self._where = where
        self.claim_timeout = claim_timeout
        self.holder = new_holder()
        self._held: set[str] = set()  # claimed by this process, outcome not recorded yet
        self._payloads = RecentPayloads()

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

    async def _close(self) -> None:
        await self._pool.close()

    async def _run(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(connection)` on a pooled connection; again on a fresh one while the server is
        unreachable (up to RETRY_FOR seconds) or when it crossed another transaction."""
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.05
        while True:
            try:
                async with self._pool.acquire() as conn:
                    return await call(conn)
            except _CROSSED:
                await asyncio.sleep(random.uniform(0.0, 0.02))
            except _GONE as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"the database {self._where} is unreachable: {exc}") from None
                log.warning("database %s: %s; trying again", self._where, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _execute(self, sql: str, *args: Any) -> str:
        async def call(conn: Any) -> str:
            return str(await conn.execute(sql, *args))

        return await self._run(call)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def call(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        return await self._run(call)

    # -- task state -------------------------------------------------------------------------

    async def load_tasks(self, source: str, *, unfinished: bool = False) -> dict[str, TaskState]:
        rows = await self._fetch(
            "SELECT id, status, progress, changed_at, stalled, missing, finished "
            "FROM tasks WHERE source = $1" + (" AND NOT finished" if unfinished else ""),
            source,
        )
        return {
            r[0]: TaskState(
                status=r[1],
                progress=r[2],
                changed_at=r[3],
                stalled=r[4],
                missing=r[5],
                finished=r[6],
            )
            for r in rows
        }

    async def source_seen(self, source: str) -> bool:
        rows = await self._fetch("SELECT seen FROM sources WHERE name = $1", source)
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
                    await conn.execute(
                        'INSERT INTO outbox (id, target, rule, event_id, title, body, "group", '
                        "created_at, next_at, updated_at) SELECT u.id, u.target, u.rule, "
                        "u.event_id, u.title, u.body, u.g, $8, u.next_at, $8 FROM unnest("
                        "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
                        "$7::text[], $9::float8[]) "
                        "AS u(id, target, rule, event_id, title, body, g, next_at) "
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

    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due deliveries of `target` (pending, or in flight with a claim that expired: its
        replica died), oldest first. SKIP LOCKED: replicas claiming at once take different rows."""
        rows = await self._fetch(
            "WITH due AS (SELECT id FROM outbox WHERE target = $1 AND next_at <= $2 "
            "AND state IN ('pending', 'inflight') "
            f"AND (state = 'pending' OR claimed_until < {_NOW}) "
            "ORDER BY next_at LIMIT $3 FOR UPDATE SKIP LOCKED) "
            f"UPDATE outbox o SET state = 'inflight', claimed_by = $4, "
            f"claimed_until = {_NOW} + $5 FROM due WHERE o.id = due.id "
            "RETURNING o.id, o.target, o.rule, o.event_id, "
            'o.title, o.body, o."group", o.attempts, o.created_at, o.next_at, o.last_error',
            target,
            now,
            limit,
            self.holder,
            self.claim_timeout,
        )
        # The events' JSON comes from RecentPayloads when this process just committed them.
        items = await claimed_items(rows, self._payloads, self._event_json)
        self._held.update(i.id for i in items)
        return items

    async def _event_json(self, ids: Sequence[str]) -> list[tuple[str, bytes]]:
        rows = await self._fetch("SELECT id, json FROM events WHERE id = ANY($1::text[])", ids)
        return [(r[0], r[1]) for r in rows]

    async def renew_claims(self) -> None:
        """While this process lives, its claims do not expire (however long a send takes)."""
        held = list(self._held)
        if held:
            await self._execute(
                f"UPDATE outbox SET claimed_until = {_NOW} + $1 WHERE id = ANY($2::text[]) "
                "AND state = 'inflight' AND claimed_by = $3",
                self.claim_timeout,
                held,
                self.holder,
            )

    async def recover(self) -> int:
        """Claims of holders that are gone (a restart on this host) go back to pending at once,
        and their leases are dropped; expired claims need nothing: `claim` takes them."""
        rows = await self._fetch(
            "SELECT DISTINCT claimed_by FROM outbox WHERE state = 'inflight' "
            "UNION SELECT holder FROM leases"
        )
        gone = [r[0] for r in rows if r[0] is not None and holder_gone(r[0])]
        if not gone:
            return 0
        count = _count(
            await self._execute(
                "UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL "
                "WHERE state = 'inflight' AND claimed_by = ANY($1::text[])",
                gone,
            )
        )
        await self._execute("DELETE FROM leases WHERE holder = ANY($1::text[])", gone)
        log_recovered(count, gone)
        return count

    async def release(self, ids: Sequence[str]) -> None:
        ids = list(ids)
        self._held.difference_update(ids)
        if ids:
            await self._execute(
                "UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL "
                "WHERE state = 'inflight' AND claimed_by = $2 AND id = ANY($1::text[])",
                ids,
                self.holder,
            )

    async def mark_sent(self, ids: Sequence[str]) -> None:
        ids = list(ids)
        if ids:
            await self._execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, updated_at = $2, "
                "last_error = NULL, claimed_by = NULL, claimed_until = NULL "
                "WHERE id = ANY($1::text[])",
                ids,
                time.time(),
            )
        self._held.difference_update(ids)

    async def mark_retry(self, id: str, next_at: float, error: str) -> None:
        await self._execute(
            "UPDATE outbox SET state = 'pending', attempts = attempts + 1, next_at = $1, "
            "last_error = $2, updated_at = $3, claimed_by = NULL, claimed_until = NULL "
            "WHERE id = $4",
            next_at,
            error,
            time.time(),
            id,
        )
        self._held.discard(id)

    async def mark_dead(self, id: str, error: str) -> None:
        await self._execute(
            "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = $1, "
            "updated_at = $2, claimed_by = NULL, claimed_until = NULL WHERE id = $3",
            error,
            time.time(),
            id,
        )
        self._held.discard(id)

    async def abandon(self, targets: Collection[str]) -> dict[str, int]:
        rows = await self._fetch(
            "UPDATE outbox SET state = 'dead', last_error = 'target ' || target || "
            "' is no longer in the config', updated_at = $1 WHERE state = 'pending' "
            "AND NOT (target = ANY($2::text[])) RETURNING target",
            time.time(),
            list(targets),
        )
        return dict(Counter(r[0] for r in rows))

    async def dead_letters(self, limit: int = 100) -> list[OutboxItem]:
        rows = await self._fetch(
            f"SELECT {_ITEM} FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE o.state = 'dead' ORDER BY o.updated_at DESC, o.id LIMIT $1",
            limit,
        )
        return [item_from_row(r) for r in rows]

    async def replay(self, ids: Sequence[str] | None) -> int:
        now = time.time()
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, next_at = $1, created_at = $1, "
            "updated_at = $1 WHERE state = 'dead'"
        )
        if ids is None:
            return _count(await self._execute(sql, now))
        return _count(await self._execute(f"{sql} AND id = ANY($2::text[])", now, list(ids)))

    @property
    def history(self) -> SqlHistory:
        return SqlHistory(lambda sql, params: self._fetch(sql, *params))

    async def recent_events(self, limit: int = 50) -> list[Event]:
        rows = await self._fetch(
            "SELECT json FROM events ORDER BY time DESC, seq DESC LIMIT $1", limit
        )
        return [Event.from_cloudevent(orjson.loads(r[0])) for r in rows]

    async def recent_deliveries(self, limit: int = 50) -> list[OutboxRow]:
        rows = await self._fetch(
            f"SELECT {_ITEM}, o.state, o.updated_at FROM outbox o "
            "JOIN events e ON e.id = o.event_id ORDER BY o.updated_at DESC, o.id LIMIT $1",
            limit,
        )
        return [OutboxRow(item_from_row(r), r[11], r[12]) for r in rows]

    async def outbox_depth(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT target, COUNT(*) FROM outbox WHERE state IN ('pending', 'inflight') "
            "GROUP BY target"
        )
        return {r[0]: r[1] for r in rows}

    async def dead_count(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT target, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY target"
        )
        return {r[0]: r[1] for r in rows}

    async def next_due(self, target: str) -> float | None:
        """The next pending delivery, or the moment another replica's claim expires (if that
        replica died, its deliveries are claimed again then)."""
        rows = await self._fetch(
            "SELECT LEAST("
            "(SELECT MIN(next_at) FROM outbox WHERE target = $1 AND state = 'pending'), "
            "(SELECT MIN(claimed_until) FROM outbox WHERE target = $1 AND state = 'inflight' "
            "AND claimed_by IS DISTINCT FROM $2))",
            target,
            self.holder,
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- retention --------------------------------------------------------------------------

    async def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete sent deliveries last updated before `before`, then the events older than
        `before` that no delivery names; `batch` rows per statement, each its own transaction.
        Replicas may prune at once: rows another one is deleting are skipped, not waited for."""
        deliveries = 0
        while True:
            count = _count(
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

    async def get_message(self, target: str, key: str) -> str | None:
        rows = await self._fetch(
            "SELECT ref FROM messages WHERE target = $1 AND key = $2", target, key
        )
        return str(rows[0][0]) if rows else None

    async def put_message(self, target: str, key: str, ref: str) -> None:
        await self._execute(
            "INSERT INTO messages (target, key, ref, updated_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (target, key) DO UPDATE SET ref = excluded.ref, "
            "updated_at = excluded.updated_at",
            target,
            key,
            ref,
            time.time(),
        )

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

    async def release_lease(self, name: str, holder: str) -> None:
        await self._execute("DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)

    async def lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._fetch(
            "SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 "
            "FROM leases WHERE name = $1 AND expires_at >= clock_timestamp()",
            name,
        )
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

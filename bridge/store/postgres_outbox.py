"""The outbox stage, shared: what PostgreSQL does with deliveries once they are stored. Replicas
claim with `FOR UPDATE SKIP LOCKED` and a visibility timeout (`claimed_until`), renewed while the
claiming process lives. postgres.py puts the store together.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from bridge.models import OutboxItem
from bridge.store.holders import log_recovered
from bridge.store.postgres_connection import PostgresConnection, rows_touched
from bridge.store.rows import claimed_items

NOW = "extract(epoch FROM clock_timestamp())"


class PostgresOutbox(PostgresConnection):
    """Claims, acks, dead letters and replays in PostgreSQL (see PostgresStore)."""

    def __init__(self, pool: Any, where: str, claim_timeout: float) -> None:
        super().__init__(pool, where, claim_timeout)
        self._held: set[str] = set()  # claimed by this process, outcome not recorded yet

    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due deliveries of `target` (pending, or in flight with a claim that expired: its
        replica died), oldest first. SKIP LOCKED: replicas claiming at once take different rows."""
        rows = await self._fetch(
            "WITH due AS (SELECT id FROM outbox WHERE target = $1 AND next_at <= $2 "
            "AND state IN ('pending', 'inflight') "
            f"AND (state = 'pending' OR (claimed_until < {NOW} AND claimed_by <> $4)) "
            "ORDER BY next_at LIMIT $3 FOR UPDATE SKIP LOCKED) "
            f"UPDATE outbox o SET state = 'inflight', claimed_by = $4, "
            f"claimed_until = {NOW} + $5 FROM due WHERE o.id = due.id "
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
                f"UPDATE outbox SET claimed_until = {NOW} + $1 WHERE id = ANY($2::text[]) "
                "AND state = 'inflight' AND claimed_by = $3",
                self.claim_timeout,
                held,
                self.holder,
            )

    async def recover(self) -> int:
        """Claims of holders that are gone (a restart on this host) go back to pending at once,
        and their leases are dropped; expired claims need nothing: `claim` takes them."""
        gone = await self._gone_holders()
        if not gone:
            return 0
        released = rows_touched(
            await self._execute(
                "UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL "
                "WHERE state = 'inflight' AND claimed_by = ANY($1::text[])",
                gone,
            )
        )
        await self._execute("DELETE FROM leases WHERE holder = ANY($1::text[])", gone)
        log_recovered(released, gone)
        return released

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

    async def replay(self, ids: Sequence[str] | None) -> int:
        now = time.time()
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, next_at = $1, created_at = $1, "
            "updated_at = $1 WHERE state = 'dead'"
        )
        if ids is None:
            return rows_touched(await self._execute(sql, now))
        return rows_touched(await self._execute(f"{sql} AND id = ANY($2::text[])", now, list(ids)))

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

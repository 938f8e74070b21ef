"""The outbox stage, shared: retention in PostgreSQL, the deletes `Store.prune` runs batch by
batch (sent deliveries, then windows of events no delivery names), each statement its own
transaction. Replicas may prune at once: rows another one is deleting are skipped, not waited for.
"""

from __future__ import annotations

from bridge.store.postgres_connection import PostgresConnection, rows_touched


class PostgresRetention(PostgresConnection):
    """`Store.prune`'s steps for the PostgreSQL store (see PostgresStore)."""

    async def _prune_sent(self, before: float, batch: int) -> int:
        return rows_touched(
            await self._execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'sent' "
                "AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before,
                batch,
            )
        )

    async def _prune_window(
        self, before: float, low: tuple[float, int], batch: int
    ) -> tuple[int, tuple[float, int] | None]:
        # In (time, seq) order; one statement picks the window, deletes in it and says where it
        # ended.
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
            return 0, None
        gone, seen, last_time, last_seq = rows[0]
        return int(gone), None if seen < batch else (last_time, last_seq)

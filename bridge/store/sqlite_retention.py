"""The outbox stage, embedded: retention in the SQLite file, the deletes `Store.prune` runs batch
by batch (sent deliveries, then windows of events no delivery names). Each batch is a write
transaction of its own, so the watchers and the deliverer get the connection between batches.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

from bridge.store.sqlite_connection import SqliteConnection


class SqliteRetention(SqliteConnection):
    """`Store.prune`'s steps for the SQLite store (see SqliteStore)."""

    async def _prune_sent(self, before: float, batch: int) -> int:
        return await self._delete(
            "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox "
            "WHERE state = 'sent' AND updated_at < ? LIMIT ?)",
            before,
            batch,
        )

    async def _prune_window(
        self, before: float, low: tuple[float, int], batch: int
    ) -> tuple[int, tuple[float, int] | None]:
        # In (time, rowid) order: the window ends at its `batch`th event (or at `before`).
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
        gone = await self._delete(
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
        return gone, high if rows else None

    async def _delete(self, sql: str, *args: Any) -> int:
        """One statement in a write transaction of its own; the rows it touched."""

        async def run(db: aiosqlite.Connection) -> int:
            async with db.execute(sql, args) as cur:
                return int(cur.rowcount)

        return await self._run(run)

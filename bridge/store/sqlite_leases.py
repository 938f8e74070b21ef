"""The outbox stage, embedded: leases (who polls a source) in the SQLite file, on this machine's
clock: the processes sharing one file share it. `Store.release_lease` is the same in both
backends (base.py).
"""

from __future__ import annotations

import time

from bridge.store.sqlite_connection import SqliteConnection


class SqliteLeases(SqliteConnection):
    """Leases for the SQLite store (see SqliteStore)."""

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

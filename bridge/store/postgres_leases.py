"""The outbox stage, shared: leases (which replica polls a source) in PostgreSQL, on the server's
clock: replicas' clocks need not agree. `Store.release_lease` is the same in both backends
(base.py).
"""

from __future__ import annotations

from bridge.store.postgres_connection import PostgresConnection


class PostgresLeases(PostgresConnection):
    """Leases for the PostgreSQL store (see PostgresStore)."""

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

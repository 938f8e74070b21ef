"""The outbox stage, embedded: what SQLite does with deliveries once they are stored. Claims
are one statement each (the hot path), marked with their holder and an expiry; acks find their
rows by the rowid the claim returned. sqlite.py puts the store together.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import aiosqlite

from bridge.models import OutboxItem
from bridge.store.holders import log_recovered
from bridge.store.rows import chunks, claimed_items
from bridge.store.sqlite_connection import CHUNK, SqliteConnection, id_hash, marks


class SqliteOutbox(SqliteConnection):
    """Claims, acks, dead letters and replays on the SQLite file (see SqliteStore)."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        super().__init__(db, path)
        # Rowids of the deliveries claimed and not settled yet: acks find their rows by rowid.
        self._rowids: dict[str, int] = {}

    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]:
        """Due pending deliveries of `target`, oldest first, marked in flight by this holder so
        no other worker (or process) takes them. A crash leaves them in flight until `recover`
        in the next process that delivers finds their holder gone or their claim expired."""
        # One statement is one transaction and one trip to the database thread: the hot path.
        # The events' JSON comes from RecentPayloads when this process just committed them.
        rows = await self._fetch(
            "UPDATE outbox SET state = 'inflight', claimed_by = ?, claimed_until = ? "
            "WHERE rowid IN ("
            "SELECT rowid FROM outbox WHERE target = ? AND state = 'pending' AND next_at <= ? "
            "ORDER BY next_at LIMIT ?) RETURNING id, target, rule, "
            "(SELECT id FROM events WHERE seq = outbox.event_seq), "
            'title, body, "group", attempts, created_at, next_at, last_error, rowid',
            self.holder,
            time.time() + self.claim_timeout,
            target,
            now,
            limit,
        )
        self._rowids.update((r[0], r[11]) for r in rows)
        return await claimed_items(rows, self._payloads, self._event_json)

    async def _event_json(self, ids: Sequence[str]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for chunk in chunks(ids, CHUNK):
            wanted = set(chunk)
            rows = await self._fetch(
                f"SELECT id, json FROM events WHERE h IN ({marks(len(chunk))})",
                *[id_hash(i) for i in chunk],
            )
            out.extend((r[0], r[1]) for r in rows if r[0] in wanted)
        return out

    async def release(self, ids: Sequence[str]) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'pending', claimed_by = NULL WHERE state = 'inflight' "
            "AND claimed_by = ? AND rowid IN",
            (self.holder,),
            ids,
        )

    async def renew_claims(self) -> None:
        await self._fetch(
            "UPDATE outbox SET claimed_until = ? WHERE state = 'inflight' AND claimed_by = ?",
            time.time() + self.claim_timeout,
            self.holder,
        )

    async def recover(self) -> int:
        """Claims of holders that are gone, or that expired (another holder stopped renewing
        them; or made before claims named their holder), go back to pending. Never our own:
        those are ours to settle, even when renewing them failed for a while."""
        gone = await self._gone_holders()

        async def run(db: aiosqlite.Connection) -> int:
            async with db.execute(
                "UPDATE outbox SET state = 'pending', claimed_by = NULL WHERE state = 'inflight' "
                "AND claimed_by IS NOT ? AND (claimed_by IS NULL OR claimed_until IS NULL "
                f"OR claimed_until < ? OR claimed_by IN ({marks(len(gone))}))",
                (self.holder, time.time(), *gone),
            ) as cur:
                count = int(cur.rowcount)
            if gone:
                await db.execute(f"DELETE FROM leases WHERE holder IN ({marks(len(gone))})", gone)
            return count

        count = await self._run(run)
        log_recovered(count, gone)
        return count

    async def mark_sent(self, ids: Sequence[str]) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'sent', attempts = attempts + 1, updated_at = ?, "
            "last_error = NULL WHERE rowid IN",
            (time.time(),),
            ids,
        )

    async def mark_retry(self, id: str, next_at: float, error: str) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'pending', attempts = attempts + 1, next_at = ?, "
            "last_error = ?, updated_at = ? WHERE rowid IN",
            (next_at, error, time.time()),
            [id],
        )

    async def mark_dead(self, id: str, error: str) -> None:
        await self._update_ids(
            "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?, "
            "updated_at = ? WHERE rowid IN",
            (error, time.time()),
            [id],
        )

    async def _rowids_of(self, ids: Sequence[str]) -> list[int]:
        """The rowids of deliveries named by id: remembered from their claim, or else looked up
        by their event and target (the id is "{event id}:{target}"; both are indexed)."""
        found: list[int] = []
        for id in ids:
            rowid = self._rowids.get(id)
            if rowid is None:
                event, _, target = id.partition(":")
                rows = await self._fetch(
                    "SELECT o.rowid FROM outbox o JOIN events e ON e.seq = o.event_seq "
                    "WHERE e.h = ? AND e.id = ? AND o.target = ?",
                    id_hash(event),
                    event,
                    target,
                )
                found.extend(r[0] for r in rows)
            else:
                found.append(rowid)
        return found

    async def _update_ids(self, sql: str, params: tuple[Any, ...], ids: Sequence[str]) -> None:
        """`sql` ends in `rowid IN`; run it for the deliveries `ids` names: one statement when
        they fit in one. The remembered rowids are dropped once it committed (a retried call
        needs them again)."""
        rowids = await self._rowids_of(ids)
        if rowids:

            async def run(db: aiosqlite.Connection) -> None:
                for chunk in chunks(rowids, CHUNK):
                    await db.execute(f"{sql} ({marks(len(chunk))})", (*params, *chunk))

            await self._run(run, write=len(rowids) > CHUNK)
        for id in ids:
            self._rowids.pop(id, None)

    async def abandon(self, targets: Collection[str]) -> dict[str, int]:
        known = list(targets)
        rows = await self._fetch(
            "UPDATE outbox SET state = 'dead', last_error = 'target ' || target || "
            "' is no longer in the config', updated_at = ? WHERE state = 'pending' "
            f"AND target NOT IN ({marks(len(known))}) RETURNING target",
            time.time(),
            *known,
        )
        return dict(Counter(r[0] for r in rows))

    async def replay(self, ids: Sequence[str] | None) -> int:
        now = time.time()
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, next_at = ?, created_at = ?, "
            "updated_at = ? WHERE state = 'dead'"
        )

        async def run(db: aiosqlite.Connection) -> int:
            if ids is None:
                async with db.execute(sql, (now, now, now)) as cur:
                    return int(cur.rowcount)
            count = 0
            for chunk in chunks(list(ids), CHUNK):
                chunk_sql = f"{sql} AND id IN ({marks(len(chunk))})"
                async with db.execute(chunk_sql, (now, now, now, *chunk)) as cur:
                    count += cur.rowcount
            return count

        return await self._run(run)

    async def next_due(self, target: str) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(next_at) FROM outbox WHERE target = ? AND state = 'pending'", target
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

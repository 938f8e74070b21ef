"""The outbox stage, embedded: a snapshot's changes written to the SQLite file, one part of
`Store.commit` per transaction: task states, the events not stored yet (found by `id_hash`, then
compared by id), their deliveries (by the event's `seq`) and the source's first contact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiosqlite

from bridge.models import Delivery, Event, TaskState, event_json
from bridge.store.rows import chunks
from bridge.store.sqlite_connection import CHUNK, SqliteConnection, id_hash, marks


class SqliteSnapshots(SqliteConnection):
    """`_commit` for the SQLite store (see SqliteStore)."""

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
        candidates: dict[str, Event] = {e.id: e for e in events}

        async def run(db: aiosqlite.Connection) -> tuple[list[Event], list[tuple[Any, ...]]]:
            known: set[str] = set()
            hashes = {e.id: id_hash(e.id) for e in candidates.values()}
            for chunk in chunks(list(hashes.values()), CHUNK):
                sql = f"SELECT id FROM events WHERE h IN ({marks(len(chunk))})"
                known.update(r[0] for r in await db.execute_fetchall(sql, chunk))
            new = [e for e in candidates.values() if e.id not in known]
            if states:
                await db.executemany(
                    "INSERT INTO tasks (source, id, status, progress, changed_at, stalled, "
                    "missing, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (source, id) DO UPDATE SET status = excluded.status, "
                    "progress = excluded.progress, changed_at = excluded.changed_at, "
                    "stalled = excluded.stalled, missing = excluded.missing, "
                    "finished = excluded.finished",
                    [
                        (
                            source,
                            task_id,
                            s.status,
                            s.progress,
                            s.changed_at,
                            int(s.stalled),
                            s.missing,
                            int(s.finished),
                        )
                        for task_id, s in states.items()
                    ],
                )
            event_rows = [
                (e.id, e.type, e.source, e.subject, e.time.timestamp(), event_json(e), hashes[e.id])
                for e in new
            ]
            if event_rows:
                # Only events not stored yet (looked up just above, in this transaction).
                await db.executemany(
                    "INSERT INTO events (id, type, source, subject, time, json, h) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    event_rows,
                )
            new_ids = {e.id for e in new}
            rows = [
                (
                    d.id,
                    d.target,
                    d.rule,
                    hashes[d.event.id],
                    d.event.id,
                    d.title,
                    d.body,
                    d.group,
                    now,
                    d.not_before.timestamp() if d.not_before else now,
                    now,
                    "pending" if d.error is None else "dead",
                    d.error,
                )
                for d in deliveries
                if d.event.id in new_ids
            ]
            if rows:
                # Only the new events' deliveries: none of them can be stored already. One whose
                # template failed is a dead letter from the start, in this same transaction.
                await db.executemany(
                    "INSERT INTO outbox (id, target, rule, event_seq, title, body, "
                    '"group", created_at, next_at, updated_at, state, last_error) '
                    "VALUES (?, ?, ?, (SELECT seq FROM events WHERE h = ? AND id = ?), "
                    "?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if seen:
                await db.execute(
                    "INSERT INTO sources (name, seen) VALUES (?, 1) "
                    "ON CONFLICT (name) DO UPDATE SET seen = 1",
                    (source,),
                )
            return new, event_rows

        new, event_rows = await self._run(run)
        for row in event_rows:
            self._payloads.put(row[0], row[5])
        return new

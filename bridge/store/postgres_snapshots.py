"""The outbox stage, shared: a snapshot's changes written to PostgreSQL, one part of
`Store.commit` per transaction: task states, events and deliveries as `unnest` arrays, one
statement each; `ON CONFLICT DO NOTHING RETURNING` says which events are new, even when another
replica stores the same ones at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.models import Delivery, Event, TaskState, event_json
from bridge.store.postgres_connection import PostgresConnection


class PostgresSnapshots(PostgresConnection):
    """`_commit` for the PostgreSQL store (see PostgresStore)."""

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

"""The outbox stage, shared: PostgreSQL holds task state, events and deliveries for several
bridge replicas. Deliveries are claimed with `FOR UPDATE SKIP LOCKED` and carry a visibility
timeout (`claimed_until`), renewed while the claiming replica lives; leases say who polls a source.

The store is put together here from one module a job: postgres_connection.py (the pool, URL
options and migrations, one transaction per call), postgres_errors.py (asyncpg errors as
StoreErrors), postgres_snapshots.py (`_commit`), postgres_outbox.py (claims, acks, dead letters),
postgres_retention.py (`prune`'s deletes), postgres_leases.py; base.py holds what both backends
run alike.
"""

from __future__ import annotations

from bridge.store.postgres_leases import PostgresLeases
from bridge.store.postgres_outbox import PostgresOutbox
from bridge.store.postgres_retention import PostgresRetention
from bridge.store.postgres_snapshots import PostgresSnapshots


class PostgresStore(PostgresSnapshots, PostgresOutbox, PostgresRetention, PostgresLeases):
    """Task state, events, outbox, dead letters and leases in PostgreSQL, shared by replicas.

    A pool of connections; every call is one transaction, retried on a fresh connection while the
    server is briefly unreachable (each call is safe to repeat: ids make inserts idempotent).
    """

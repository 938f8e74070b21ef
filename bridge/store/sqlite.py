"""The outbox stage, embedded: one SQLite file holds task state, events, the deliveries still owed
to targets, leases and source health. A snapshot's new events and their deliveries are written
before anything is sent (in parts of COMMIT_CHUNK events, its states with the last, see
`Store.commit`); `deliver.py` then claims, sends and marks them. Several processes may open the
file: commands beside `bridge run`, or two `bridge run` (as replicas).

The store is put together here from one module a job: sqlite_connection.py (the file, its
pragmas and migrations, one transaction per call), sqlite_errors.py (sqlite3 errors as
StoreErrors), sqlite_snapshots.py (`_commit`), sqlite_outbox.py (claims, acks, dead letters),
sqlite_retention.py (`prune`'s deletes), sqlite_leases.py; base.py holds what both backends
run alike.
"""

from __future__ import annotations

from bridge.store.sqlite_leases import SqliteLeases
from bridge.store.sqlite_outbox import SqliteOutbox
from bridge.store.sqlite_retention import SqliteRetention
from bridge.store.sqlite_snapshots import SqliteSnapshots


class SqliteStore(SqliteSnapshots, SqliteOutbox, SqliteRetention, SqliteLeases):
    """Task state, events, outbox, dead letters and leases in one SQLite file (WAL mode).

    One connection per process: aiosqlite runs every statement on the connection's own thread,
    and a lock keeps each call's statements (one transaction) together. Other processes on the
    file wait for the write lock (busy_timeout), then the retry policy (retry.py).
    """

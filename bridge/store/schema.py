"""The outbox stage's schema: one list of migrations per backend, applied at start. Each entry moves
the schema one version up; never edit an entry once released, append a new one (to both lists
when both backends gain the table).
"""

from __future__ import annotations

# `PRAGMA user_version` says how many are applied.
SQLITE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sources (
        name TEXT PRIMARY KEY,
        seen INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE tasks (
        source TEXT NOT NULL,
        id TEXT NOT NULL,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL,
        changed_at REAL NOT NULL,
        stalled INTEGER NOT NULL DEFAULT 0,
        missing INTEGER NOT NULL DEFAULT 0,
        finished INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (source, id)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        subject TEXT NOT NULL,
        time REAL NOT NULL,
        json BLOB NOT NULL
    );
    CREATE INDEX events_time ON events (time);
    CREATE TABLE outbox (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        rule TEXT NOT NULL,
        event_id TEXT NOT NULL REFERENCES events (id),
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        "group" TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_error TEXT,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'inflight', 'sent', 'dead'))
    );
    CREATE INDEX outbox_due ON outbox (target, state, next_at);
    CREATE INDEX outbox_state ON outbox (state, updated_at);
    """,
    """
    CREATE TABLE messages (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        ref TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (target, key)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    CREATE INDEX tasks_open ON tasks (source) WHERE finished = 0;
    """,
    # Retention (Store.prune): an event is deleted only when no outbox row names it, and the
    # foreign key is checked on every deleted event; without this both scan the whole outbox.
    """
    CREATE INDEX outbox_event ON outbox (event_id);
    """,
    # Claims only look at pending rows: indexing just those (as PostgreSQL's outbox_due does)
    # spares every claim and every ack an index move, which is most of the outbox's own cost.
    """
    DROP INDEX outbox_due;
    CREATE INDEX outbox_due ON outbox (target, next_at) WHERE state = 'pending';
    """,
    # Every index on a random key (event ids are hashes) gets a new page dirtied by almost every
    # insert once the table is large, so storing a snapshot slowed down as the database grew
    # (7x at 80,000 events). The outbox now refers to its event by the event's sequence number
    # (ascending, like the outbox's own rowid) and is found by rowid. Re-detection must still
    # find an event by its id: through `h`, a 64-bit hash of the id (SqliteStore's id_hash),
    # the one random index left, at a third of the text id's size; the id is compared after.
    # An outbox row's id ("{event id}:{target}") is still stored and shown; it is no longer a key.
    # Runs with foreign keys off (SqliteStore._migrate), as SQLite's table rebuild asks, on a
    # connection that has `id_hash` registered.
    """
    CREATE TABLE events_v7 (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        h INTEGER NOT NULL,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        subject TEXT NOT NULL,
        time REAL NOT NULL,
        json BLOB NOT NULL
    );
    INSERT INTO events_v7 (seq, id, h, type, source, subject, time, json)
        SELECT rowid, id, id_hash(id), type, source, subject, time, json FROM events
        ORDER BY rowid;
    CREATE TABLE outbox_v7 (
        id TEXT NOT NULL,
        target TEXT NOT NULL,
        rule TEXT NOT NULL,
        event_seq INTEGER NOT NULL REFERENCES events_v7 (seq),
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        "group" TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_error TEXT,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'inflight', 'sent', 'dead'))
    );
    INSERT INTO outbox_v7 (id, target, rule, event_seq, title, body, "group", attempts,
            created_at, next_at, updated_at, last_error, state)
        SELECT o.id, o.target, o.rule, e.seq, o.title, o.body, o."group", o.attempts,
            o.created_at, o.next_at, o.updated_at, o.last_error, o.state
        FROM outbox o JOIN events_v7 e ON e.id = o.event_id ORDER BY o.rowid;
    DROP TABLE outbox;
    DROP TABLE events;
    ALTER TABLE events_v7 RENAME TO events;
    ALTER TABLE outbox_v7 RENAME TO outbox;
    CREATE INDEX events_time ON events (time);
    CREATE INDEX events_h ON events (h);
    CREATE INDEX outbox_due ON outbox (target, next_at) WHERE state = 'pending';
    CREATE INDEX outbox_state ON outbox (state, updated_at);
    CREATE INDEX outbox_event ON outbox (event_seq);
    """,
    # A claim names its holder and lasts `claim_timeout` unless renewed, as PostgreSQL's do: the
    # process that delivers hands back only the claims of holders that are gone (Store.recover),
    # so opening the file (a command, a second `bridge run`) never takes a live bridge's claims.
    """
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
    ALTER TABLE outbox ADD COLUMN claimed_until REAL;
    """,
    # Source health (models.Outage as JSON; NULL: healthy), carried across reloads and leaders.
    """
    ALTER TABLE sources ADD COLUMN outage TEXT;
    """,
)

# The version lives in `bridge_schema`; migrations run under an advisory lock, so replicas that
# start together apply each one once. Times are epoch seconds (double precision) like SQLite's,
# except lease expiry, which is the server's clock so replicas' clocks need not agree.
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sources (
        name TEXT PRIMARY KEY,
        seen BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE tasks (
        source TEXT NOT NULL,
        id TEXT NOT NULL,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL,
        changed_at DOUBLE PRECISION NOT NULL,
        stalled BOOLEAN NOT NULL DEFAULT false,
        missing INTEGER NOT NULL DEFAULT 0,
        finished BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (source, id)
    );
    CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        subject TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        json BYTEA NOT NULL
    );
    CREATE INDEX events_time ON events (time, seq);
    CREATE TABLE outbox (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        rule TEXT NOT NULL,
        event_id TEXT NOT NULL REFERENCES events (id),
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        "group" TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'inflight', 'sent', 'dead')),
        claimed_by TEXT,
        claimed_until DOUBLE PRECISION
    );
    CREATE INDEX outbox_due ON outbox (target, next_at) WHERE state IN ('pending', 'inflight');
    CREATE INDEX outbox_state ON outbox (state, updated_at);
    CREATE INDEX outbox_updated ON outbox (updated_at);
    CREATE TABLE messages (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        ref TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (target, key)
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    """,
    """
    CREATE INDEX tasks_open ON tasks (source) WHERE NOT finished;
    """,
    """
    CREATE INDEX outbox_event ON outbox (event_id);
    """,
    # Source health (models.Outage as JSON; NULL: healthy), carried across reloads and leaders.
    """
    ALTER TABLE sources ADD COLUMN outage TEXT;
    """,
)

"""The outbox stage, embedded: the SQLite store's error boundary. A sqlite3 error becomes a
`StoreError` that says whether trying again may cure it (retry.py runs such a call again).
"""

from __future__ import annotations

import sqlite3

from bridge.errors import StoreError

# sqlite3's primary result codes (the low byte of `sqlite_errorcode`) that trying again may cure,
# with what they mean for an operator. Everything else (corrupt, not a database, read-only,
# constraint, an SQL error) is not retried.
_TRANSIENT = {
    sqlite3.SQLITE_BUSY: "busy",
    sqlite3.SQLITE_LOCKED: "locked",
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_NOMEM: "out of memory",
    sqlite3.SQLITE_PROTOCOL: "locked",
}
_PERMANENT = {
    sqlite3.SQLITE_CORRUPT: "corrupt",
    sqlite3.SQLITE_NOTADB: "corrupt",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_CANTOPEN: "cannot open",
}


def translate(exc: sqlite3.Error, path: str) -> StoreError:
    """The store's boundary: a sqlite3 error as a StoreError, transient or not."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _TRANSIENT:
        return StoreError(f"database {path}: {exc}", transient=True, kind=_TRANSIENT[primary])
    return StoreError(f"database {path}: {exc}", kind=_PERMANENT.get(primary or 0, "error"))

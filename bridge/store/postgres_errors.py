"""The outbox stage, shared: the PostgreSQL store's error boundary. An asyncpg or connection error
becomes a `StoreError` that says whether trying again may cure it (retry.py runs such a call again).
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

from bridge.errors import StoreError

# SQLSTATE classes and codes that trying again may cure, with what they mean for an operator
# (https://www.postgresql.org/docs/current/errcodes-appendix.html). The rest is not retried.
_TRANSIENT_STATES = {
    "08": "connection lost",  # connection exception
    "53": "out of resources",  # insufficient resources (53100: disk full)
    "57P01": "connection lost",  # admin shutdown
    "57P02": "connection lost",  # crash shutdown
    "57P03": "starting up",  # cannot connect now
    "40001": "conflict",  # serialization failure: two transactions crossed
    "40P01": "conflict",  # deadlock detected
    "55P03": "locked",  # lock not available
}


def translate(exc: BaseException, where: str) -> StoreError:
    """The store's boundary: an asyncpg or connection error as a StoreError."""
    message = f"database {where}: {exc}"
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        kind = _TRANSIENT_STATES.get(state) or _TRANSIENT_STATES.get(state[:2])
        if state == "53100":
            kind = "disk full"
        return StoreError(message, transient=kind is not None, kind=kind or "error")
    if isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return StoreError(message, transient=True, kind="connection lost")
    return StoreError(message)

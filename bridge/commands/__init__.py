"""The commands that act on a bridge from outside it, one module each: `check.py` (`bridge check`'s
verdict), `events.py` (`bridge events tail|show`, `bridge explain --event`), `dlq.py` (`bridge dlq
list|replay`), `send_test.py` (`bridge send-test`), `track.py` (`bridge track`, `bridge
hash-password`). cli.py parses the arguments and maps what these return to exit codes; nothing
here parses arguments.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bridge.store import Store, is_postgres

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


async def open_for_reading(db: str, *, readonly: bool = True) -> Store | None:
    """The store (by default read-only: nothing a running bridge holds is touched), or None (a
    message printed) when `db` names no SQLite file: a command never creates an empty database."""
    if not is_postgres(db) and not await asyncio.to_thread(Path(db).exists):
        print(f"bridge: {db}: no such database (set --db or BRIDGE_DB)", file=sys.stderr)
        return None
    return await Store.open(db, readonly=readonly)


def where(db: str) -> str:
    """The database as a message names it (a PostgreSQL URL may carry a password)."""
    return "the PostgreSQL database" if is_postgres(db) else db

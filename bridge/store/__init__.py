"""The outbox stage: task state, events and the deliveries still owed to targets, behind one
interface with two backends: SQLite (embedded, one process; the default) and PostgreSQL (several
replicas share it). `open_store("bridge.db")` or `open_store("postgresql://...")`.
"""

from __future__ import annotations

from bridge.store.base import OutboxItem, OutboxRow, Store, is_postgres


async def open_store(url_or_path: str) -> Store:
    """Open (creating or migrating) the store `--db` names: a postgresql:// URL or a file path."""
    return await Store.open(url_or_path)


__all__ = ["OutboxItem", "OutboxRow", "Store", "is_postgres", "open_store"]

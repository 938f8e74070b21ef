"""The outbox stage: task state, events and the deliveries still owed to targets, behind one
interface with two backends: SQLite (embedded; the default) and PostgreSQL (several replicas
share it). `open_store("bridge.db")` or `open_store("postgresql://...")`. Consumers take the
role they need (bridge/roles.py), not the whole Store.
"""

from __future__ import annotations

from bridge.models import OutboxItem
from bridge.store.base import Store, is_postgres
from bridge.store.rows import OutboxRow


async def open_store(url_or_path: str, *, readonly: bool = False) -> Store:
    """Open (creating or migrating) the store `--db` names: a postgresql:// URL or a file path."""
    return await Store.open(url_or_path, readonly=readonly)


__all__ = ["OutboxItem", "OutboxRow", "Store", "is_postgres", "open_store"]

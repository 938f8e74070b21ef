"""Housekeeping beside the outbox: sent deliveries and the events no delivery needs any more are
deleted once they are older than `retention:`, so a long-running bridge's database stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bridge.errors import StoreError
from bridge.store import Store
from bridge.templates import duration

log = logging.getLogger("bridge.retention")


async def prune_forever(
    store: Store,
    retention: float,
    every: float = 3600.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Prune what is older than `retention` seconds at once, then every `every` seconds, until
    cancelled. `retention` 0 keeps everything (returns at once). A store error is logged and the
    next round tries again: housekeeping must never stop the bridge."""
    if retention <= 0:
        return
    while True:
        started = time.monotonic()
        try:
            deliveries, events = await store.prune(clock() - retention)
        except StoreError as exc:
            log.warning("pruning failed (tried again in %s): %s", duration(every), exc)
        else:
            if deliveries or events:
                log.info(
                    "pruned %d sent deliveries and %d events older than %s",
                    deliveries,
                    events,
                    duration(retention),
                )
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))

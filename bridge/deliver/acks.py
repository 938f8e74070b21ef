"""The deliver stage's acks: deliveries a target accepted are marked sent in batches, so a busy
target costs the outbox one transaction per few hundred sends instead of one per send.
"""

from __future__ import annotations

import asyncio
import contextlib

from bridge.roles import Outbox

# Acks wait this long for company before they are written: one transaction then marks a few
# hundred sends instead of a few each, which leaves the database to claims. A crash in between
# only re-sends them, under the same webhook-id.
ACK_GATHER = 0.05
ACK_BATCH = 1024


class Acks:
    """Accepted deliveries on their way to `mark_sent`: `add()` on each send, `run()` writes them
    until `close()`, `flush()` writes what is left. One per `Deliverer.run()`."""

    def __init__(self, store: Outbox) -> None:
        self._store = store
        self._ids: list[str] = []
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._closed = False

    def add(self, ids: list[str]) -> None:
        """The target accepted these (the hot path: no await, nothing allocated)."""
        self._ids.extend(ids)
        self._arrived.set()
        if len(self._ids) >= ACK_BATCH:
            self._full.set()

    def close(self) -> None:
        """No more sends: `run()` writes what it holds and returns."""
        self._closed = True
        self._arrived.set()
        self._full.set()

    async def run(self) -> None:
        """Marks accepted deliveries sent in batches: every ack that arrives while one batch is
        being written goes into the next, so a busy target costs one transaction per batch."""
        while True:
            await self._arrived.wait()
            if not self._closed and len(self._ids) < ACK_BATCH:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ACK_GATHER):
                        await self._full.wait()
            self._arrived.clear()
            self._full.clear()
            await self.flush()
            if self._closed:
                return

    async def flush(self) -> None:
        if self._ids:
            ids, self._ids = self._ids, []
            await self._store.mark_sent(ids)

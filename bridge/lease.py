"""Around the poll loop: with several replicas on one store, each source is polled by exactly one
of them. `while_leader` runs the poll loop only while this process holds the source's lease in
the store, and stops it the moment the lease is lost.

The renewal shares the event loop with the poll, so a stretch of work that holds the loop (a
first contact with 100,000 tasks) delays it: the lease lasts at least MIN_TTL whatever the poll
interval, the heavy parts of a poll run off the loop (sources/poll.py, watch/), and a renewal
answered late still counts. The store's answer decides, not the stall: a renewal succeeds only
while the lease row still names this holder, so no other replica took it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bridge.errors import StoreError
from bridge.roles import Leases

log = logging.getLogger("bridge.lease")

#: Seconds a source's lease lasts at least. It must outlast what delays a renewal, which does not
#: shrink with the poll interval: a database round trip (or a retry of one), a garbage collection
#: or a stretch of CPU-heavy work on the event loop, on a busy host. 0.3 s (1.5 intervals of
#: 200 ms) did not, and a replica lost its lease in the middle of every long first poll.
MIN_TTL = 5.0

#: Steps of a renewal's patience (see `_renew`): how often a renewal in flight is looked at.
_STEPS = 20


def lease_ttl(poll_interval: float) -> float:
    """The lease of a source lasts 1.5 poll intervals, at least MIN_TTL, and is renewed every
    third of that: a replica that dies is replaced within that long (plus one poll) of its last
    renewal."""
    return max(MIN_TTL, 1.5 * poll_interval)


def source_lease(source: str) -> str:
    return f"source:{source}"


async def while_leader(
    store: Leases,
    name: str,
    holder: str,
    ttl: float,
    body: Callable[[], Awaitable[None]],
) -> None:
    """Run `body()` whenever `holder` holds the lease `name`; until cancelled.

    Not holding it, try again when the current holder's lease runs out (at most every ttl/2).
    Holding it, renew every ttl/3; when a renewal finds another holder (or cannot reach the store
    for so long that the lease may have run out), cancel `body` and go back to waiting. `body`
    returning ends the leadership and this call; `body` raising releases the lease and raises.
    Each call of `body` starts from the shared store: build new per-leadership state inside it.
    """
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        if await _attempt(store, name, holder, ttl):
            log.info("%s: lease taken by %s; running here", name, holder)
            if await _lead(store, name, holder, ttl, body, asked):
                return
            log.warning("%s: lease lost by %s; stopped here", name, holder)
        await asyncio.sleep(await _wait(store, name, ttl))


async def _attempt(store: Leases, name: str, holder: str, ttl: float) -> bool:
    try:
        return await store.try_lease(name, holder, ttl)
    except StoreError as exc:
        log.warning("%s: cannot take the lease: %s", name, exc)
        return False


async def _wait(store: Leases, name: str, ttl: float) -> float:
    """How long until trying again: until the holder's lease runs out, ttl/2 at most."""
    try:
        current = await store.lease(name)
    except StoreError:
        return ttl / 2
    if current is None:
        return 0.01
    return min(ttl / 2, max(0.01, current[1] + 0.01))


async def _lead(
    store: Leases,
    name: str,
    holder: str,
    ttl: float,
    body: Callable[[], Awaitable[None]],
    renewed: float,  # when the (successful) request for the lease was sent, in loop time
) -> bool:
    """Run `body` while the lease holds. True when `body` returned on its own."""
    loop = asyncio.get_running_loop()
    period = ttl / 3
    running = asyncio.ensure_future(body())
    try:
        while True:
            await asyncio.wait([running], timeout=period)
            if running.done():
                running.result()  # raises what body raised
                return True
            asked = loop.time()
            try:
                held = await _renew(store, name, holder, ttl, period)
            except (StoreError, TimeoutError) as exc:
                # Unknown: keep running while the lease surely lasts past the next check.
                if loop.time() + period < renewed + ttl:
                    log.warning("%s: lease not renewed (%s); trying again", name, _why(exc))
                    continue
                log.warning("%s: lease not renewed (%s) and about to expire", name, _why(exc))
                return False
            if not held:
                return False
            renewed = asked
    finally:
        if not running.done():
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(running, return_exceptions=True)
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(ttl):
                await store.release_lease(name, holder)


async def _renew(store: Leases, name: str, holder: str, ttl: float, patience: float) -> bool:
    """The store's answer to one renewal; TimeoutError when it gave none within `patience`
    seconds of a running event loop. A stall of this process (the loop held by other work) counts
    as one short step, not as its length: the answer, when it comes, still says whether another
    holder took the lease meanwhile, and a True one means none did."""
    loop = asyncio.get_running_loop()
    step, left = patience / _STEPS, patience
    renewal = asyncio.ensure_future(store.renew_lease(name, holder, ttl))
    try:
        while not renewal.done() and left > 0:
            before = loop.time()
            await asyncio.wait([renewal], timeout=step)
            left -= min(loop.time() - before, step)
        if not renewal.done():
            raise TimeoutError(f"no answer from the store within {patience:.1f}s")
        return renewal.result()
    finally:
        if not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(renewal, return_exceptions=True)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

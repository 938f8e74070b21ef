"""The publishing step of every change: rules -> outbox for its events, committed in one store
transaction with the task states that produced them, then the deliverer woken.
Pipeline: source -> diff -> **rules -> outbox** -> targets. Every Watcher publishes through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.logs import fields
from bridge.models import Delivery, Event, TaskState
from bridge.roles import TaskStates
from bridge.rules import Router

log = logging.getLogger("bridge.watch")

# A large change (a first contact with `backfill: true`: 100,000 events, about 3 s of routing and
# templates, 1 s of log lines) is worked through in slices of SLICE events, and the event loop is
# let go whenever the work since it last was went over STRETCH seconds: renewals, deliveries,
# /healthz and /readyz answer meanwhile. A small change is done in one piece, as before.
SLICE = 32
STRETCH = 0.02


def _nothing() -> None:
    pass


class Pace:
    """Lets the event loop run other work once this stretch of work went over STRETCH."""

    __slots__ = ("_mark",)

    def __init__(self) -> None:
        self._mark = time.perf_counter()

    async def __call__(self) -> None:
        if time.perf_counter() - self._mark > STRETCH:
            await asyncio.sleep(0)
            self._mark = time.perf_counter()


@dataclass(slots=True)
class Publisher:
    """Rules -> outbox for the events of one change, committed with the states that produced them.
    The router is swapped whole on reload; `on_event` feeds printing (demo) and metrics."""

    store: TaskStates
    router: Router
    wake: Callable[[], None]
    on_event: list[Callable[[Event], None]] = field(default_factory=list)
    # One change is routed at a time: routing a large one lets the loop go between slices, and
    # another source's change must not be routed in between (the throttle and digest memory sees
    # each change whole, in order, as when routing never let go). Uncontended, it never waits.
    _routing: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def publish(
        self,
        source: str,
        states: dict[str, TaskState],
        events: Sequence[Event],
        *,
        now: float,
        seen: bool = True,
        progress: Callable[[], None] = _nothing,
    ) -> list[Event]:
        """`progress()` after each step of a large change (a slice routed or logged, a part of
        the commit stored): the caller's poll is working, not hanging."""
        deliveries = await self.route(events, now, progress) if events else []
        # A delivery whose template went over a sandbox limit carries `error`: the commit stores
        # it as a dead letter with that reason, in the transaction that stores its event.
        new = await self.store.commit(
            source, states, events, deliveries, seen=seen, progress=self.wake, step=progress
        )
        stored = {event.id for event in new}
        for d in deliveries:
            if d.error is not None and d.event.id in stored:
                log.error("%s: %s", d.target, d.error, extra=fields(source=source))
        if deliveries:
            self.wake()
        pace = Pace()
        for n, event in enumerate(new):
            if n % SLICE == 0:
                progress()
                await pace()
            log.info(
                "%s %s %s",
                event.type,
                event.source,
                event.subject,
                extra=fields(
                    source=event.source,
                    task=event.subject,
                    event_type=event.type,
                    event_id=event.id,
                ),
            )
            for callback in self.on_event:
                callback(event)
        return new

    async def route(
        self, events: Sequence[Event], now: float, progress: Callable[[], None] = _nothing
    ) -> list[Delivery]:
        """`router.route(events, now)`, slice by slice, letting the loop go between slices when
        routing takes long: the same deliveries in the same order, and the same throttle and
        digest memory, as routing them in one call."""
        router = self.router
        deliveries: list[Delivery] = []
        async with self._routing:
            pace = Pace()
            for start in range(0, len(events), SLICE):
                progress()
                await pace()
                deliveries += router.route(events[start : start + SLICE], now)
        return deliveries

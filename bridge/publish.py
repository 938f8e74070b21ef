"""The publishing step of every change: rules -> outbox for its events, committed in one store
transaction with the task states that produced them, then the deliverer woken.
Pipeline: source -> diff -> **rules -> outbox** -> targets. Every Watcher publishes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.logs import fields
from bridge.models import Event, TaskState
from bridge.roles import TaskStates
from bridge.rules import Router

log = logging.getLogger("bridge.watch")


@dataclass(slots=True)
class Publisher:
    """Rules -> outbox for the events of one change, committed with the states that produced them.
    The router is swapped whole on reload; `on_event` feeds printing (demo) and metrics."""

    store: TaskStates
    router: Router
    wake: Callable[[], None]
    on_event: list[Callable[[Event], None]] = field(default_factory=list)

    async def publish(
        self,
        source: str,
        states: dict[str, TaskState],
        events: Sequence[Event],
        *,
        now: float,
        seen: bool = True,
    ) -> list[Event]:
        deliveries = self.router.route(events, now) if events else []
        # A delivery whose template went over a sandbox limit carries `error`: the commit stores
        # it as a dead letter with that reason, in the transaction that stores its event.
        new = await self.store.commit(
            source, states, events, deliveries, seen=seen, progress=self.wake
        )
        stored = {event.id for event in new}
        for d in deliveries:
            if d.error is not None and d.event.id in stored:
                log.error("%s: %s", d.target, d.error, extra=fields(source=source))
        if deliveries:
            self.wake()
        for event in new:
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

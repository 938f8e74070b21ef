"""The deliver stage's failures: a send the target did not take becomes a retry or a dead letter,
and a target that keeps failing is probed one delivery at a time until it accepts again. The
decisions are lanes.py's (`after_failure`, `why_give_up`); this acts on them, off the hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from bridge.deliver.lanes import Lane, after_failure, backoff, units, why_give_up
from bridge.errors import DeliveryError, redact
from bridge.logs import fields
from bridge.models import OutboxItem
from bridge.roles import Outbox

# The deliverer's logger: its lines keep the name operators know them by (bridge.deliver).
log = logging.getLogger("bridge.deliver")


class Failures:
    """What the deliverer does with a failed send, and with a target while it keeps failing.
    `count(target, outcome, n)` is the deliverer's tally (outcome: retry, dead)."""

    def __init__(
        self,
        store: Outbox,
        count: Callable[[str, str, int], None],
        *,
        backoff_base: float | None,
        backoff_cap: float | None,
        idle: float,
    ) -> None:
        self._store = store
        self._count = count
        # Overrides of every target's `backoff` and `backoff_cap` (tests).
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._idle = idle

    async def failed(self, lane: Lane, unit: list[OutboxItem], error: DeliveryError) -> None:
        """The target did not take `unit`: each of its deliveries is tried again later (while the
        target fails: after the next probe) or becomes a dead letter."""
        now = time.time()
        message = redact(str(error))
        probing = unit is lane.probe
        if probing:
            lane.probe = None
        retry = after_failure(
            lane.health,
            error,
            message,
            probe=probing,
            probe_at=lane.probe_at,
            now=now,
            backoff=lambda failures: self._backoff(lane, failures),
        )
        lane.probe_at = retry.probe_at
        if retry.wait is not None and lane.health.failures == 1:
            # Loud once when it starts failing, and once when it recovers (recovered()); each
            # try in between is a debug line.
            log.warning(
                "%s: the target is failing (%s); its deliveries wait and one at a time "
                "is tried, next in %.1fs (steps up to %gs; dead letters after max_age %gs)",
                lane.name,
                message,
                retry.wait,
                lane.config.backoff_cap if self._backoff_cap is None else self._backoff_cap,
                lane.config.max_age,
                extra=fields(target=lane.name),
            )
        next_at = retry.at  # None: the unit becomes dead letters
        for item in unit:
            attempts = item.attempts + 1
            give_up = why_give_up(lane.config, item, attempts, retry=next_at is not None, now=now)
            if give_up is not None:
                await self.dead(lane, item, f"{message} ({give_up})", attempts)
                continue
            assert next_at is not None
            await self._store.mark_retry(item.id, next_at, message)
            self._count(lane.name, "retry", 1)
            log.debug(
                "%s; retry %s in %.2fs",
                message if message.startswith(f"{lane.name}: ") else f"{lane.name}: {message}",
                item.id,
                next_at - now,
                extra=_fields(lane, item, attempts),
            )
            lane.held.discard(item.id)
        lane.fresh = True  # the next due time may have moved closer
        lane.signal.set()

    def recovered(self, lane: Lane, now: float) -> None:
        """A failing target accepted a delivery: what waited is sent again (the deliverer then
        marks the target up)."""
        health = lane.health
        assert health.failing_since is not None
        log.warning(
            "%s: the target accepts deliveries again, after %.0fs failing (%d failed tries); "
            "sending what waited",
            lane.name,
            now - health.failing_since,
            health.failures,
            extra=fields(target=lane.name),
        )
        lane.probe, lane.probe_at, lane.fresh = None, 0.0, True
        lane.signal.set()

    async def claim_probe(self, lane: Lane, batch: int) -> list[OutboxItem] | None:
        """The failing lane's turn: when the probe is due, claim the oldest deliveries, keep the
        first as the probe (returned, to be sent), make dead letters of those past `max_age` and
        hand the rest back untouched. None: no probe to send now."""
        now = time.time()
        if not (
            lane.probe is None and now >= lane.probe_at and (lane.fresh or now >= lane.look_at)
        ):
            return None
        lane.fresh = False
        items = await self._store.claim(lane.name, now, batch)
        if not items:
            due = await self._store.next_due(lane.name)
            lane.look_at = now + self._idle if due is None else min(now + self._idle, due)
            return None
        probe, *rest = units(items)
        lane.held.update(i.id for i in items)
        back: list[str] = []
        for item in (i for unit in rest for i in unit):
            if now - item.created_at >= lane.config.max_age:
                why = f"{lane.health.last_error} (gave up: older than max_age)"
                await self.dead(lane, item, why, item.attempts)
            else:
                back.append(item.id)
        if back:
            await self._store.release(back)
            lane.held.difference_update(back)
        lane.probe = probe
        return probe

    async def dead(self, lane: Lane, item: OutboxItem, why: str, attempts: int) -> None:
        await self._store.mark_dead(item.id, why)
        self._count(lane.name, "dead", 1)
        log.warning(
            "%s: delivery %s is a dead letter: %s",
            lane.name,
            item.id,
            why,
            extra=_fields(lane, item, attempts),
        )
        lane.held.discard(item.id)

    def _backoff(self, lane: Lane, failures: int) -> float:
        base = lane.config.backoff if self._backoff_base is None else self._backoff_base
        cap = lane.config.backoff_cap if self._backoff_cap is None else self._backoff_cap
        return backoff(failures, base, max(cap, base))


def _fields(lane: Lane, item: OutboxItem, attempt: int) -> dict[str, Any]:
    event = item.event  # parsed on this failure path only; a send never parses it
    return fields(
        target=lane.name,
        delivery_id=item.id,
        attempt=attempt,
        event_id=event.id,
        event_type=event.type,
        source=event.source,
        task=event.subject,
    )

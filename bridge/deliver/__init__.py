"""The deliver stage: outbox workers, one lane per target. Claims due deliveries, sends them,
marks them sent only once the target accepted. The only place retries, backoff, rate limits,
dead letters and digests live (each lane's state and pacing: lanes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import TargetConfig
from bridge.deliver.acks import Acks
from bridge.deliver.lanes import Lane, TargetHealth, backoff, bucket_for, units, why_give_up
from bridge.errors import DeliveryError, redact
from bridge.logs import fields
from bridge.models import OutboxItem
from bridge.roles import Outbox
from bridge.targets import Target

log = logging.getLogger(__name__)

# What each attempt's outcome is called in metrics: a retry is a temporary failure, a dead letter
# a permanent one (refused for good, or out of attempts or age).
OUTCOMES = {"sent": "sent", "retry": "temporary_failure", "dead": "permanent_failure"}


class Deliverer:
    """Runs one lane per target: `concurrency` sends in flight, retries persisted in the outbox.

    `counts[(target, outcome)]` (outcome: sent, retry, dead) is there for metrics."""

    def __init__(
        self,
        store: Outbox,
        targets: Mapping[str, Target],
        configs: Mapping[str, TargetConfig],
        *,
        backoff_base: float | None = None,
        backoff_cap: float | None = None,
        idle: float = 5.0,
        on_outcome: Callable[[str, str, int], None] | None = None,
        on_sent: Callable[[str, list[float]], None] | None = None,
    ) -> None:
        self._store = store
        # Called with (target, outcome, count), outcome one of OUTCOMES' values: metrics.
        self._on_outcome = on_outcome
        # Called with (target, seconds from each delivery's creation to its acceptance): metrics.
        self._on_sent = on_sent
        self._lanes = [
            Lane(name, target, configs[name], bucket_for(configs[name]))
            for name, target in targets.items()
        ]
        # Overrides of every target's `backoff` and `backoff_cap` (tests).
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # Deliveries may also appear without a wake() (e.g. `bridge dlq replay` from another
        # process), so an idle lane looks again after this many seconds.
        self._idle = idle
        self._acks = Acks(store)
        self._stopping = False
        self._running = False
        self._done = asyncio.Event()
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def health(self) -> dict[str, TargetHealth]:
        """Each target's health, by name."""
        return {lane.name: lane.health for lane in self._lanes}

    def wake(self) -> None:
        """New deliveries were committed: idle lanes claim now instead of at their next due time."""
        for lane in self._lanes:
            lane.fresh = True
            lane.signal.set()

    async def run(self) -> None:
        """Deliver until cancelled or drained."""
        if self._running:
            raise RuntimeError("Deliverer.run() is already running")
        self._running, self._stopping = True, False
        self._acks = acks = Acks(self._store)
        self._done.clear()
        try:
            # Only the process that delivers takes back what a gone process left claimed.
            await self._store.recover()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(acks.run())
                keeper = tg.create_task(self._store.keep_claims())
                try:
                    async with asyncio.TaskGroup() as lanes:
                        for lane in self._lanes:
                            lanes.create_task(self._lane(lane))
                finally:
                    keeper.cancel()
                    acks.close()
        finally:
            try:
                # Acks first: a delivery the target accepted must not be handed back as unsent.
                await acks.flush()
                held = [i for lane in self._lanes for i in lane.held]
                if held:
                    await self._store.release(held)
                    log.info("handed %d deliveries back to the outbox, to be sent later", len(held))
                for lane in self._lanes:
                    lane.held.clear()
            finally:
                self._running = False
                self._done.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 (the seam in design.md)
        """Shutdown: stop claiming, give in-flight sends up to `timeout` seconds, hand the rest
        back to the outbox (they are sent again after a restart)."""
        if not self._running:
            return
        self._stopping = True
        self.wake()
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            for lane in self._lanes:
                for task in list(lane.active):
                    task.cancel()
            await self._done.wait()

    # -- a lane -----------------------------------------------------------------------------

    async def _lane(self, lane: Lane) -> None:
        concurrency = lane.config.concurrency
        # Large claims keep the database off the hot path (one claim per few hundred sends); a
        # rate-limited target claims only what it can send soon.
        batch = max(256, 8 * concurrency)
        if lane.config.rate_limit is not None:
            batch = max(2, min(batch, 2 * lane.config.rate_limit[0]))
        low = batch // 2
        waiting: deque[list[OutboxItem]] = deque()
        ready = asyncio.Event()  # `waiting` has work, or the lane is stopping

        async def sender() -> None:
            # `concurrency` long-lived senders rather than a task per send: on a busy target
            # the per-send cost is the send itself.
            while True:
                while not waiting:
                    if self._stopping:
                        return
                    ready.clear()
                    await ready.wait()
                if self._stopping:
                    return
                unit = waiting.popleft()
                if lane.health.failing_since is not None and unit is not lane.probe:
                    # Claimed before the target failed: back to the outbox, no attempt counted.
                    lane.parked.extend(i.id for i in unit)
                    lane.signal.set()
                    continue
                if len(waiting) < low:
                    lane.signal.set()  # the claimer tops the queue up
                await self._deliver(lane, unit)

        async with asyncio.TaskGroup() as tg:
            lane.active = {tg.create_task(sender()) for _ in range(concurrency)}
            try:
                while not self._stopping:
                    # Cleared before looking at the state: anything that changes it sets it again.
                    lane.signal.clear()
                    if lane.parked:
                        ids, lane.parked = lane.parked, []
                        await self._store.release(ids)
                        lane.held.difference_update(ids)
                    if lane.health.failing_since is not None:
                        await self._probe(lane, waiting, ready, batch)
                        continue
                    # Claim the next batch while half of this one is still queued, so sends never
                    # wait for a claim; after an empty claim, only once woken or due.
                    if len(waiting) < low and (lane.fresh or time.time() >= lane.look_at):
                        lane.fresh = False
                        items = await self._store.claim(lane.name, time.time(), batch)
                        if items:
                            lane.fresh = True  # there may be more
                            lane.held.update(i.id for i in items)
                            waiting.extend(units(items))
                            ready.set()
                            continue
                        due = await self._store.next_due(lane.name)
                        lane.look_at = time.time() + self._idle
                        if due is not None:
                            lane.look_at = min(lane.look_at, due)
                    timeout = None  # a full queue waits for the senders to drain it
                    if len(waiting) < low:
                        timeout = max(0.0, lane.look_at - time.time())
                    if self._stopping:
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await lane.signal.wait()
            finally:
                ready.set()  # idle senders see `_stopping` and return; busy ones finish first
        lane.active = set()
        # Claimed but never started: they stay in `held` and run() hands them back.

    async def _deliver(self, lane: Lane, unit: list[OutboxItem]) -> None:
        try:
            if lane.bucket is not None:
                await lane.bucket.acquire()
            if len(unit) == 1:
                await lane.target.send(unit[0])
            else:
                await lane.target.send_digest(unit)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A bug in a target must not stop the lane; the delivery is kept and retried.
            log.exception("%s: unexpected error while sending", lane.name)
            error = DeliveryError(
                f"{lane.name}: unexpected {type(exc).__name__}: {redact(str(exc))}",
                retryable=True,
            )
        else:
            ids = [i.id for i in unit]
            lane.held.difference_update(ids)
            self._acks.add(ids)
            self._count(lane.name, "sent", len(ids))
            self._accepted(lane, unit)
            return
        await self._failed(lane, unit, error)

    def _accepted(self, lane: Lane, unit: list[OutboxItem]) -> None:
        now = time.time()
        health = lane.health
        if health.failing_since is not None:
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
        health.failing_since, health.failures, health.last_ok = None, 0, now
        if self._on_sent is not None:
            self._on_sent(lane.name, [now - i.created_at for i in unit])

    async def _probe(
        self, lane: Lane, waiting: deque[list[OutboxItem]], ready: asyncio.Event, batch: int
    ) -> None:
        """The failing lane's turn: when the probe is due, claim the oldest deliveries, try the
        first, make dead letters of those past `max_age` and hand the rest back untouched."""
        now = time.time()
        if lane.probe is None and now >= lane.probe_at and (lane.fresh or now >= lane.look_at):
            lane.fresh = False
            items = await self._store.claim(lane.name, now, batch)
            if items:
                probe, *rest = units(items)
                lane.held.update(i.id for i in items)
                back: list[str] = []
                for item in (i for unit in rest for i in unit):
                    if now - item.created_at >= lane.config.max_age:
                        why = f"{lane.health.last_error} (gave up: older than max_age)"
                        await self._dead(lane, item, why, item.attempts)
                    else:
                        back.append(item.id)
                if back:
                    await self._store.release(back)
                    lane.held.difference_update(back)
                lane.probe = probe
                waiting.append(probe)
                ready.set()
            else:
                due = await self._store.next_due(lane.name)
                lane.look_at = now + self._idle if due is None else min(now + self._idle, due)
        if self._stopping:
            return
        timeout = None
        if lane.probe is None:
            look = lane.probe_at if lane.fresh else max(lane.probe_at, lane.look_at)
            timeout = max(0.0, look - time.time())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await lane.signal.wait()

    def _backoff(self, lane: Lane, failures: int) -> float:
        base = lane.config.backoff if self._backoff_base is None else self._backoff_base
        cap = lane.config.backoff_cap if self._backoff_cap is None else self._backoff_cap
        return backoff(failures, base, max(cap, base))

    async def _failed(self, lane: Lane, unit: list[OutboxItem], error: DeliveryError) -> None:
        now = time.time()
        message = redact(str(error))
        health = lane.health
        probing = unit is lane.probe
        if probing:
            lane.probe = None
        next_at = None  # when this unit is tried again; None: it becomes a dead letter
        if error.deferred:
            next_at = now + (error.retry_after or 0.0)
        elif error.retryable:
            health.last_error, health.last_error_at = message, now
            if health.failing_since is None:
                health.failing_since, health.failures = now, 0
                probing = True
            if probing:
                health.failures += 1
                wait = error.retry_after
                if wait is None:
                    wait = self._backoff(lane, health.failures)
                lane.probe_at = now + wait
                if health.failures == 1:
                    # Loud once when it starts failing, and once when it recovers (_accepted);
                    # each try in between is a debug line.
                    log.warning(
                        "%s: the target is failing (%s); its deliveries wait and one at a time "
                        "is tried, next in %.1fs (steps up to %gs; dead letters after max_age %gs)",
                        lane.name,
                        message,
                        wait,
                        lane.config.backoff_cap if self._backoff_cap is None else self._backoff_cap,
                        lane.config.max_age,
                        extra=fields(target=lane.name),
                    )
            next_at = max(lane.probe_at, now)
        else:
            health.last_error, health.last_error_at = message, now
        for item in unit:
            attempts = item.attempts + 1
            give_up = why_give_up(lane.config, item, attempts, retry=next_at is not None, now=now)
            if give_up is not None:
                await self._dead(lane, item, f"{message} ({give_up})", attempts)
                continue
            assert next_at is not None
            await self._store.mark_retry(item.id, next_at, message)
            self._count(lane.name, "retry")
            log.debug(
                "%s; retry %s in %.2fs",
                message if message.startswith(f"{lane.name}: ") else f"{lane.name}: {message}",
                item.id,
                next_at - now,
                extra=self._fields(lane, item, attempts),
            )
            lane.held.discard(item.id)
        lane.fresh = True  # the next due time may have moved closer
        lane.signal.set()

    async def _dead(self, lane: Lane, item: OutboxItem, why: str, attempts: int) -> None:
        await self._store.mark_dead(item.id, why)
        self._count(lane.name, "dead")
        log.warning(
            "%s: delivery %s is a dead letter: %s",
            lane.name,
            item.id,
            why,
            extra=self._fields(lane, item, attempts),
        )
        lane.held.discard(item.id)

    @staticmethod
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

    def _count(self, target: str, outcome: str, n: int = 1) -> None:
        self.counts[(target, outcome)] += n
        if self._on_outcome is not None:
            self._on_outcome(target, OUTCOMES[outcome], n)

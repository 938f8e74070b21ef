"""The deliver stage: outbox workers, one lane per target. Claims due deliveries, sends them,
marks them sent only once the target accepted. The only place retries, backoff, rate limits,
dead letters and digests live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import TargetConfig
from bridge.errors import DeliveryError, redact
from bridge.logs import fields
from bridge.store import OutboxItem, Store
from bridge.targets import Target

log = logging.getLogger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 600.0
# What each attempt's outcome is called in metrics: a retry is a temporary failure, a dead letter
# a permanent one (refused for good, or out of attempts or age).
OUTCOMES = {"sent": "sent", "retry": "temporary_failure", "dead": "permanent_failure"}
# Acks wait this long for company before they are written: one transaction then marks a few
# hundred sends instead of a few each, which leaves the database to claims. A crash in between
# only re-sends them, under the same webhook-id.
ACK_GATHER = 0.05
ACK_BATCH = 1024


def backoff(attempts: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempts)], so a
    crowd of failed deliveries does not come back in lockstep (AWS architecture blog)."""
    return random.uniform(0.0, min(cap, base * 2.0 ** min(attempts, 32)))


class TokenBucket:
    """`count` sends per `period` seconds, bursts up to `count`. Reservations are taken
    synchronously, so concurrent senders never overdraw it."""

    def __init__(
        self, count: int, period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = count / period
        self._capacity = float(count)
        self._tokens = float(count)
        self._clock = clock
        self._stamp = clock()

    def reserve(self) -> float:
        """Take one token; return how long to wait before using it."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


def units(items: Sequence[OutboxItem]) -> list[list[OutboxItem]]:
    """Split claimed items into messages: one per item, one per digest group claimed together."""
    out: list[list[OutboxItem]] = []
    groups: dict[str, list[OutboxItem]] = {}
    for item in items:
        if item.group is None:
            out.append([item])
        elif item.group in groups:
            groups[item.group].append(item)
        else:
            groups[item.group] = [item]
            out.append(groups[item.group])
    return out


def _bucket(config: TargetConfig) -> TokenBucket | None:
    if config.rate_limit is None:
        return None
    count, period = config.rate_limit
    return TokenBucket(count, period)


@dataclass(slots=True)
class TargetHealth:
    """How a target is doing, for logs, metrics and the status page: failing from its first
    failed attempt until an attempt succeeds."""

    failing_since: float | None = None
    failures: int = 0  # failed attempts since it last accepted one
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok: float | None = None

    @property
    def up(self) -> bool:
        return self.failing_since is None


@dataclass(eq=False, slots=True)
class _Lane:
    """One target's worker state."""

    name: str
    target: Target
    config: TargetConfig
    bucket: TokenBucket | None
    signal: asyncio.Event = field(default_factory=asyncio.Event)
    held: set[str] = field(default_factory=set)  # claimed by us, outcome not recorded yet
    fresh: bool = True  # the outbox may hold due items this lane has not claimed
    look_at: float = 0.0  # when to claim again unasked (next due time, or the idle period)
    active: set[asyncio.Task[None]] = field(default_factory=set)
    health: TargetHealth = field(default_factory=TargetHealth)


class Deliverer:
    """Runs one lane per target: `concurrency` sends in flight, retries persisted in the outbox.

    `counts[(target, outcome)]` (outcome: sent, retry, dead) is there for metrics."""

    def __init__(
        self,
        store: Store,
        targets: Mapping[str, Target],
        configs: Mapping[str, TargetConfig],
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
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
            _Lane(name, target, configs[name], _bucket(configs[name]))
            for name, target in targets.items()
        ]
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # Deliveries may also appear without a wake() (e.g. `bridge dlq replay` from another
        # process), so an idle lane looks again after this many seconds.
        self._idle = idle
        self._acks: list[str] = []
        self._ack_signal = asyncio.Event()
        self._ack_full = asyncio.Event()
        self._lanes_done = False
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
        self._running, self._stopping, self._lanes_done = True, False, False
        self._done.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._acker())
                try:
                    async with asyncio.TaskGroup() as lanes:
                        for lane in self._lanes:
                            lanes.create_task(self._lane(lane))
                finally:
                    self._lanes_done = True
                    self._ack_signal.set()
                    self._ack_full.set()
        finally:
            try:
                # Acks first: a delivery the target accepted must not be handed back as unsent.
                await self._flush_acks()
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

    async def _lane(self, lane: _Lane) -> None:
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
                if len(waiting) < low:
                    lane.signal.set()  # the claimer tops the queue up
                await self._deliver(lane, unit)

        async with asyncio.TaskGroup() as tg:
            lane.active = {tg.create_task(sender()) for _ in range(concurrency)}
            try:
                while not self._stopping:
                    # Cleared before looking at the state: anything that changes it sets it again.
                    lane.signal.clear()
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

    async def _deliver(self, lane: _Lane, unit: list[OutboxItem]) -> None:
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
            self._acks.extend(ids)
            self._ack_signal.set()
            if len(self._acks) >= ACK_BATCH:
                self._ack_full.set()
            self._count(lane.name, "sent", len(ids))
            self._accepted(lane, unit)
            return
        await self._failed(lane, unit, error)

    def _accepted(self, lane: _Lane, unit: list[OutboxItem]) -> None:
        now = time.time()
        health = lane.health
        if health.failing_since is not None:
            log.info(
                "%s: delivering again after %d failed attempt(s) over %.0fs",
                lane.name,
                health.failures,
                now - health.failing_since,
                extra=fields(target=lane.name),
            )
        health.failing_since, health.failures, health.last_ok = None, 0, now
        if self._on_sent is not None:
            self._on_sent(lane.name, [now - i.created_at for i in unit])

    async def _failed(self, lane: _Lane, unit: list[OutboxItem], error: DeliveryError) -> None:
        now = time.time()
        message = redact(str(error))
        health = lane.health
        health.failures += 1
        health.last_error, health.last_error_at = message, now
        # Loud once when a target starts failing (and again when it recovers, in _accepted);
        # each retry while it stays down is a debug line, not hundreds of info lines a minute.
        first = health.failing_since is None
        if first:
            health.failing_since = now
        for item in unit:
            attempts = item.attempts + 1
            give_up = None
            if not error.retryable:
                give_up = "not retryable"
            elif attempts >= lane.config.max_attempts:
                give_up = f"gave up after {attempts} attempts"
            elif now - item.created_at >= lane.config.max_age:
                give_up = f"gave up: older than max_age ({lane.config.max_age:g}s)"
            if give_up is not None:
                await self._store.mark_dead(item.id, f"{message} ({give_up})")
                self._count(lane.name, "dead")
                log.warning(
                    "%s: delivery %s is a dead letter: %s",
                    lane.name,
                    item.id,
                    message,
                    extra=self._fields(lane, item, attempts),
                )
            else:
                delay = error.retry_after
                if delay is None:
                    delay = backoff(item.attempts, self._backoff_base, self._backoff_cap)
                await self._store.mark_retry(item.id, now + delay, message)
                self._count(lane.name, "retry")
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s: %s; retry %s in %.2fs%s",
                    lane.name,
                    message,
                    item.id,
                    delay,
                    " (the target is failing: retries are logged at debug until it recovers)"
                    if first
                    else "",
                    extra=self._fields(lane, item, attempts),
                )
                first = False
            lane.held.discard(item.id)
        lane.fresh = True  # the next due time may have moved closer
        lane.signal.set()

    @staticmethod
    def _fields(lane: _Lane, item: OutboxItem, attempt: int) -> dict[str, Any]:
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

    # -- acks -------------------------------------------------------------------------------

    async def _acker(self) -> None:
        """Marks accepted deliveries sent in batches: every ack that arrives while one batch is
        being written goes into the next, so a busy target costs one transaction per batch."""
        while True:
            await self._ack_signal.wait()
            if not self._lanes_done and len(self._acks) < ACK_BATCH:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ACK_GATHER):
                        await self._ack_full.wait()
            self._ack_signal.clear()
            self._ack_full.clear()
            await self._flush_acks()
            if self._lanes_done:
                return

    async def _flush_acks(self) -> None:
        if self._acks:
            ids, self._acks = self._acks, []
            await self._store.mark_sent(ids)

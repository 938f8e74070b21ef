"""The deliver stage: outbox workers, one lane per target. Claims due deliveries, sends them,
marks them sent only once the target accepted. The only place retries, backoff, rate limits,
dead letters and digests live: the lanes and their senders here (the hot path), each lane's
state and pacing in lanes.py, failed sends and failing targets in failures.py, acks in acks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

from bridge.config import TargetConfig
from bridge.deliver.acks import Acks
from bridge.deliver.failures import Failures
from bridge.deliver.lanes import Lane, TargetHealth, bucket_for, units
from bridge.errors import DeliveryError, redact
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
        # Deliveries may also appear without a wake() (e.g. `bridge dlq replay` from another
        # process), so an idle lane looks again after this many seconds.
        self._idle = idle
        self._failures = Failures(
            store, self._count, backoff_base=backoff_base, backoff_cap=backoff_cap, idle=idle
        )
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
                        # One delivery at a time while the target fails, the rest in the outbox.
                        probe = await self._failures.claim_probe(lane, batch)
                        if probe is not None:
                            waiting.append(probe)
                            ready.set()
                        timeout = None  # a probe in flight: its outcome sets the signal
                        if lane.probe is None:
                            look = lane.probe_at if lane.fresh else max(lane.probe_at, lane.look_at)
                            timeout = max(0.0, look - time.time())
                    else:
                        # Claim the next batch while half of this one is still queued, so sends
                        # never wait for a claim; after an empty claim, only once woken or due.
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
        await self._failures.failed(lane, unit, error)

    def _accepted(self, lane: Lane, unit: list[OutboxItem]) -> None:
        now = time.time()
        health = lane.health
        if health.failing_since is not None:
            self._failures.recovered(lane, now)
        health.failing_since, health.failures, health.last_ok = None, 0, now
        if self._on_sent is not None:
            self._on_sent(lane.name, [now - i.created_at for i in unit])

    def _count(self, target: str, outcome: str, n: int = 1) -> None:
        self.counts[(target, outcome)] += n
        if self._on_outcome is not None:
            self._on_outcome(target, OUTCOMES[outcome], n)

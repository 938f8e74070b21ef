"""A target's lane in the deliver stage, what it is and how it is paced: backoff after failures,
the token bucket of `rate_limit`, claimed items grouped into messages (digests), the target's
health, when a failed send is tried again and when it is given up. No I/O here: the deliverer
(__init__.py) runs the lanes, failures.py acts on these decisions.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.config import TargetConfig
from bridge.errors import DeliveryError
from bridge.models import OutboxItem
from bridge.targets import Target


def backoff(failures: int, base: float, cap: float) -> float:
    """The wait after the `failures`-th failure in a row: `base` doubled each time up to `cap`,
    with equal jitter (uniform in the upper half), so waits never exceed the cap and a crowd of
    bridges does not come back in lockstep (AWS architecture blog)."""
    step = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 32))
    return random.uniform(step / 2, step)


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


def bucket_for(config: TargetConfig) -> TokenBucket | None:
    if config.rate_limit is None:
        return None
    count, period = config.rate_limit
    return TokenBucket(count, period)


@dataclass(slots=True)
class TargetHealth:
    """How a target is doing, for logs, metrics and the status page: failing from its first
    failed attempt until an attempt succeeds."""

    failing_since: float | None = None  # its first retryable failure since it last accepted one
    failures: int = 0  # retryable failures in a row
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok: float | None = None

    @property
    def up(self) -> bool:
        return self.failing_since is None


@dataclass(eq=False, slots=True)
class Lane:
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
    # While the target keeps failing (health.failing_since), one delivery (the probe) is tried
    # at a time and the rest wait in the outbox; the first success sends them all again.
    probe_at: float = 0.0  # when the next probe may go
    probe: list[OutboxItem] | None = None  # the unit being tried, while one is
    parked: list[str] = field(default_factory=list)  # claimed before it failed; to hand back


def why_give_up(
    config: TargetConfig, item: OutboxItem, attempts: int, *, retry: bool, now: float
) -> str | None:
    """Why a failed delivery becomes a dead letter instead of being tried again, or None."""
    if not retry:
        return "not retryable"
    if config.max_attempts is not None and attempts >= config.max_attempts:
        return f"gave up after {attempts} attempts"
    if now - item.created_at >= config.max_age:
        return f"gave up: older than max_age ({config.max_age:g}s)"
    return None


@dataclass(frozen=True, slots=True)
class Retry:
    """What a failed send means for its unit and its lane (`after_failure`)."""

    at: float | None  # when the unit is tried again; None: its deliveries become dead letters
    probe_at: float  # when the failing target's next probe may go
    wait: float | None = None  # set when this failure scheduled that probe: seconds until it


def after_failure(
    health: TargetHealth,
    error: DeliveryError,
    message: str,
    *,
    probe: bool,
    probe_at: float,
    now: float,
    backoff: Callable[[int], float],
) -> Retry:
    """Record a failed send in `health` and decide when its unit is tried again. `probe`: the unit
    was the failing target's probe; `backoff(failures)` the wait after that many in a row.

    Deferred (not the target's fault): only the unit waits, `retry_after`. Not retryable: a dead
    letter. Retryable: the target is failing from its first such failure; that failure and each
    failed probe step the backoff (or take the target's Retry-After) to the next probe, and every
    unit that fails meanwhile waits for that probe."""
    if error.deferred:
        return Retry(now + (error.retry_after or 0.0), probe_at)
    health.last_error, health.last_error_at = message, now
    if not error.retryable:
        return Retry(None, probe_at)
    wait = None
    if health.failing_since is None:
        health.failing_since, health.failures = now, 0
        probe = True
    if probe:
        health.failures += 1
        wait = error.retry_after
        if wait is None:
            wait = backoff(health.failures)
        probe_at = now + wait
    return Retry(max(probe_at, now), probe_at, wait)

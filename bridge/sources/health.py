"""Source health: consecutive poll failures -> one `source.down`, the next good answer -> one
`source.up`, and how long to wait before the next poll. Pure (the caller passes `now`).
`SourceStatus` is what the status page and /readyz show of a source (its Watcher fills it in).
Pipeline: **source** -> snapshot -> diff; these events join the diff's on their way to the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from bridge.models import Event, EventType, Outage, event_id, iso

__all__ = ["READY_INTERVALS", "SourceHealth", "SourceStatus", "readiness"]

READY_INTERVALS = 3  # /readyz: every source answered within this many poll intervals


class SourceHealth:
    """One per source. `failure()` after each failed poll, `success()` after each good one; each
    returns the event to emit, if any. Event ids come from (source, type, when the outage began),
    so re-deciding the same outage after a restart gives the same ids."""

    def __init__(
        self, source: str, *, threshold: int = 3, max_backoff: float = 60.0, factor: float = 10.0
    ) -> None:
        self.source = source
        self.threshold = threshold
        self.max_backoff = max_backoff
        self.factor = factor  # backoff is also capped at factor x poll_interval
        self.failures = 0  # consecutive failed polls
        self.since: float | None = None  # when the current run of failures began
        self.down = False  # source.down was emitted and source.up not yet
        self.reason: str | None = None  # of the last failure
        self.message: str | None = None

    def failure(self, reason: str, now: float, message: str = "") -> Event | None:
        """Record a failed poll; `source.down` on the `threshold`-th failure in a row."""
        self.failures += 1
        self.reason, self.message = reason, message
        if self.since is None:
            self.since = now
        if self.down or self.failures < self.threshold:
            return None
        self.down = True
        return self._event(
            EventType.SOURCE_DOWN.value,
            now,
            {
                "reason": reason,
                "message": message,
                "failures": self.failures,
                "since": iso(datetime.fromtimestamp(self.since, UTC)),
            },
        )

    def success(self, now: float) -> Event | None:
        """Record a good poll; `source.up` when the source was down."""
        up = self.recovered(now)
        self.failures, self.since, self.down = 0, None, False
        self.reason = self.message = None
        return up

    def recovered(self, now: float) -> Event | None:
        """The `source.up` a good poll now would emit, without recording the poll (the watcher
        records it once the poll's changes are committed)."""
        if not self.down or self.since is None:
            return None
        since = self.since
        data = {"since": iso(datetime.fromtimestamp(since, UTC)), "down_for": round(now - since, 3)}
        return self._event(EventType.SOURCE_UP.value, now, data, since)

    def outage(self) -> Outage | None:
        """The run of failures as the store keeps it (None: healthy), so the next poller of the
        source (after a reload, or another replica) carries it on instead of starting over."""
        if self.failures == 0 or self.since is None:
            return None
        down_id = event_id(self.source, EventType.SOURCE_DOWN.value, self.since)
        return Outage(
            since=self.since,
            failures=self.failures,
            down=self.down,
            reason=self.reason,
            message=self.message,
            down_id=down_id if self.down else None,
        )

    def restore(self, outage: Outage | None) -> None:
        """Take up the run of failures the store kept (None: healthy)."""
        if outage is None:
            self.failures, self.since, self.down = 0, None, False
            self.reason = self.message = None
            return
        self.failures, self.since, self.down = outage.failures, outage.since, outage.down
        self.reason, self.message = outage.reason, outage.message

    def backoff(self, poll_interval: float) -> float:
        """Seconds until the next poll: the interval while healthy, doubling with each failure in
        a row, capped at `max_backoff` or `factor` x the interval, whichever is smaller (but never
        below the interval itself)."""
        if self.failures == 0:
            return poll_interval
        cap = max(poll_interval, min(self.max_backoff, self.factor * poll_interval))
        return min(cap, poll_interval * 2.0 ** min(self.failures, 32))

    def _event(
        self, type_: str, now: float, data: dict[str, object], since: float | None = None
    ) -> Event:
        began = self.since if since is None else since
        return Event(
            id=event_id(self.source, type_, began),
            type=type_,
            source=self.source,
            subject=self.source,
            time=datetime.fromtimestamp(now, UTC),
            data=data,
        )


@dataclass(slots=True)
class SourceStatus:
    """What the status page and /readyz show of a source."""

    name: str
    up: bool = True
    last_ok: float | None = None  # when the last good poll ended (its changes stored)
    polling_since: float | None = None  # when the poll in progress began; None between polls
    moved_at: float | None = None  # when it last moved on: an answer read, a step of storing it
    last_error: str | None = None
    last_error_at: float | None = None
    tracked: int = 0
    unfinished: int = 0
    polls: int = 0
    mode: str = ""  # the way of reading chosen (list | active | ids); "" until probed
    mode_reason: str = ""
    note: str = ""  # what the way of reading allows now, e.g. a delay bound; "" when nothing


def readiness(
    status: SourceStatus, *, failing: bool, now: float, interval: float, timeout: float
) -> tuple[bool, str]:
    """Whether a source polled here counts as answering (/readyz), and what to say of it.

    Its last good poll ended within READY_INTERVALS poll intervals; or a poll is in progress, no
    poll failed since the last good one, and it moved on (an answer read, a step of storing it)
    within that limit plus the source's `timeout`. A long poll that has not failed (a first
    contact with 100,000 tasks) is the bridge doing its job; one that hangs counts at most
    `timeout` later than with no poll in progress. A poll after a failed one gets no such grace:
    a source whose every poll hangs until its timeout is not ready."""
    limit = READY_INTERVALS * interval
    last_ok, since = status.last_ok, status.polling_since
    if last_ok is not None and now - last_ok <= limit:
        return True, f"ok (last poll {now - last_ok:.1f}s ago)"
    if since is not None and not failing:
        running, grace = now - since, limit + timeout
        still = now - (since if status.moved_at is None else status.moved_at)
        first = "first poll" if last_ok is None else "a poll"
        if still <= grace:
            return True, f"ok ({first} in progress for {running:.1f}s)"
        return False, (
            f"{first} in progress for {running:.1f}s, stuck for {still:.1f}s (limit {grace:g}s)"
        )
    if last_ok is None:
        return False, "no successful poll yet"
    return False, f"no successful poll for {now - last_ok:.1f}s (limit {limit:g}s)"

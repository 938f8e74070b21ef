"""The nouns every stage shares: the upstream task's fields, the Event the diff emits, the Delivery
the rules make of it. A task stays the upstream's JSON dict (normalize.py); frozen dataclasses
inside.

Pipeline: source -> snapshot -> diff -> events -> rules -> outbox -> targets.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

JSON = dict[str, Any]


class Status(StrEnum):
    NOT_START = "NOT_START"
    MODAL = "MODAL"
    SUBMITTED = "SUBMITTED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCEL = "CANCEL"


# Status only moves forward: NOT_START < MODAL < SUBMITTED < IN_PROGRESS < SUCCESS|FAILURE|CANCEL.
# An empty status (a fresh new-api row) ranks as NOT_START; an unknown one as 0 too, so it never
# blocks a later known status and never counts as finished.
STATUS_RANK: dict[str, int] = {
    "": 0,
    Status.NOT_START: 0,
    Status.MODAL: 1,
    Status.SUBMITTED: 2,
    Status.IN_PROGRESS: 3,
    Status.SUCCESS: 4,
    Status.FAILURE: 4,
    Status.CANCEL: 4,
}
TERMINAL: frozenset[str] = frozenset({Status.SUCCESS, Status.FAILURE, Status.CANCEL})
UNFINISHED: tuple[str, ...] = (
    Status.NOT_START,
    Status.MODAL,
    Status.SUBMITTED,
    Status.IN_PROGRESS,
)


def status_rank(status: str | None) -> int:
    return STATUS_RANK.get(status or "", 0)


# The fields of a task as the midjourney-proxy family documents them (docs reference, section 4).
# Rows stay plain dicts (normalize.py): nothing is validated against this list; conditions.py lets
# a `when` key name these without the `task.` prefix. Unknown fields are kept and passed on.
TASK_FIELDS: tuple[str, ...] = (
    "id", "action", "status", "progress", "prompt", "promptEn", "description", "state",
    "submitTime", "startTime", "finishTime", "imageUrl", "failReason", "buttons", "properties",
)  # fmt: skip


class EventType(StrEnum):
    SUBMITTED = "task.submitted"
    MODAL = "task.modal"
    STARTED = "task.started"
    PROGRESS = "task.progress"
    SUCCEEDED = "task.succeeded"
    FAILED = "task.failed"
    CANCELLED = "task.cancelled"
    STALLED = "task.stalled"
    VANISHED = "task.vanished"
    SOURCE_DOWN = "source.down"
    SOURCE_UP = "source.up"


EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)


def event_id(*parts: object) -> str:
    """Deterministic id from (source, subject, type, new state): re-detecting the same change
    after a crash yields the same id, so receivers can de-duplicate on `webhook-id`."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=16)
    return "evt_" + digest.hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=256)
def iso(ts: datetime) -> str:
    """RFC 3339 in UTC with milliseconds. Cached: the events of one snapshot share their time."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    """A change of a task (or of a source). `task` is the upstream JSON as it was sent, normalised
    only as docs/design.md's Normalisation says; `data` carries the rest of the CloudEvents `data`
    object."""

    id: str
    type: str
    source: str
    subject: str
    time: datetime
    task: JSON | None = None
    previous: JSON | None = None
    data: JSON = field(default_factory=dict)

    def cloudevent(self) -> JSON:
        data: JSON = dict(self.data)
        if self.task is not None:
            data["task"] = self.task
        if self.previous is not None:
            data["previous"] = self.previous
        return {
            "specversion": "1.0",
            "id": self.id,
            "type": self.type,
            "source": f"bridge/{self.source}",
            "subject": self.subject,
            "time": iso(self.time),
            "datacontenttype": "application/json",
            "data": data,
        }

    @classmethod
    def from_cloudevent(cls, body: JSON) -> Event:
        data = dict(body.get("data") or {})
        task = data.pop("task", None)
        previous = data.pop("previous", None)
        source = str(body.get("source", ""))
        source = source.removeprefix("bridge/")
        raw_time = body.get("time")
        time = datetime.fromisoformat(raw_time.replace("Z", "+00:00")) if raw_time else utcnow()
        return cls(
            id=str(body.get("id", "")),
            type=str(body.get("type", "")),
            source=source,
            subject=str(body.get("subject", "")),
            time=time,
            task=task,
            previous=previous,
            data=data,
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way to one target, as the rules rendered it. Stored in the outbox.

    `group` is set for digest rules: deliveries with the same group that are due together are sent
    as one message. `not_before` delays the first attempt (the digest window)."""

    id: str
    target: str
    rule: str
    event: Event
    title: str
    body: str
    group: str | None = None
    not_before: datetime | None = None
    # Set when the rule's template went over a limit of the sandbox: `Store.commit` stores the
    # delivery as a dead letter with this reason, carrying the default title and body.
    error: str | None = None


def delivery_id(event_id: str, target: str) -> str:
    """One delivery per (event, target), however many rules route the event there."""
    return event_id + ":" + target


# -- what the diff keeps and the outbox holds (stored by bridge/store) ---------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    tasks: list[dict[str, Any]]  # normalised task dicts (see normalize.py); each has a str "id"
    missing: frozenset[str] = frozenset()  # tracked ids looked up by id and NOT found this look
    complete: bool = True  # True: `tasks` is the whole list (poll); False: a partial view (push)


@dataclass(frozen=True, slots=True)
class TaskState:
    status: str  # as the upstream said it ("" when empty); unknown values kept
    progress: int  # 0..100, -1 when unknown
    changed_at: float  # unix seconds of the last change the bridge saw (for stall_after)
    stalled: bool = False  # task.stalled already emitted for this stall
    missing: int = 0  # consecutive looks that confirmed it gone (task.vanished at 2)
    finished: bool = False  # terminal or vanished: never emits again


def event_json(event: Event) -> bytes:
    return orjson.dumps(event.cloudevent())


class OutboxItem:
    """One delivery as the outbox holds it: what to send, and how it went so far.

    The event travels as the CloudEvents JSON it was stored as (`payload`) and is parsed only when
    a target asks for `event`: a webhook sends the stored bytes as they are, so claiming and
    sending a delivery never parses and re-serialises its event (the delivery hot path)."""

    __slots__ = (
        "_event",
        "_payload",
        "attempts",
        "body",
        "created_at",
        "group",
        "id",
        "last_error",
        "next_at",
        "rule",
        "target",
        "title",
    )

    def __init__(
        self,
        *,
        id: str,
        target: str,
        rule: str,
        title: str,
        body: str,
        group: str | None,
        attempts: int,
        created_at: float,
        next_at: float,
        last_error: str | None,
        event: Event | None = None,
        payload: bytes | None = None,
    ) -> None:
        if event is None and payload is None:
            raise ValueError("an OutboxItem needs its event or the event's JSON")
        self.id = id
        self.target = target
        self.rule = rule
        self.title = title
        self.body = body
        self.group = group
        self.attempts = attempts
        self.created_at = created_at
        self.next_at = next_at
        self.last_error = last_error
        self._event = event
        self._payload = payload

    @property
    def event(self) -> Event:
        if self._event is None:
            assert self._payload is not None
            self._event = Event.from_cloudevent(orjson.loads(self._payload))
        return self._event

    @property
    def event_id(self) -> str:
        """The event's id without parsing it: the outbox id is `{event id}:{target}`."""
        suffix = ":" + self.target
        return self.id.removesuffix(suffix) if self.id.endswith(suffix) else self.event.id

    @property
    def payload(self) -> bytes:
        """The event as CloudEvents JSON: the webhook body."""
        if self._payload is None:
            self._payload = event_json(self.event)
        return self._payload

    def __repr__(self) -> str:
        return f"OutboxItem(id={self.id!r}, target={self.target!r}, attempts={self.attempts})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutboxItem):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in _ITEM_FIELDS)

    __hash__ = None  # type: ignore[assignment]


_ITEM_FIELDS = (
    "id",
    "target",
    "rule",
    "title",
    "body",
    "group",
    "attempts",
    "created_at",
    "next_at",
    "last_error",
    "event",
)


@dataclass(frozen=True, slots=True)
class Outage:
    """A source's run of failed polls as the store keeps it (sources/health.py decides it), so a
    reload or a new leader carries it on: one `source.down` and one `source.up` per outage."""

    since: float  # when the first failed poll of the run happened
    failures: int  # failed polls in a row
    down: bool  # `source.down` was emitted and `source.up` not yet
    reason: str | None = None  # of the last failure
    message: str | None = None
    down_id: str | None = None  # the id of the open `source.down`

    def to_json(self) -> JSON:
        return {
            "since": self.since,
            "failures": self.failures,
            "down": self.down,
            "reason": self.reason,
            "message": self.message,
            "down_id": self.down_id,
        }

    @classmethod
    def from_json(cls, data: JSON) -> Outage:
        return cls(
            since=float(data["since"]),
            failures=int(data["failures"]),
            down=bool(data["down"]),
            reason=data.get("reason"),
            message=data.get("message"),
            down_id=data.get("down_id"),
        )

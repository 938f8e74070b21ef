"""The diff: previous task states + one snapshot -> events + the states that changed.
Pure (no I/O, no clock: `now` is passed in). Pipeline: source -> snapshot -> **diff** -> events.

The rules, in the order `diff` applies them to each task of a snapshot:

- A finished task (terminal or vanished) never emits again; it costs two dict lookups.
- A task seen for the first time emits the event of the state it is in: NOT_START, SUBMITTED or an
  empty status -> `task.submitted`, MODAL -> `task.modal`, IN_PROGRESS -> `task.started`, SUCCESS ->
  `task.succeeded`, FAILURE -> `task.failed`, CANCEL -> `task.cancelled`.
- Status only moves forward by rank. A jump (SUBMITTED -> SUCCESS) emits only the event of the new
  state: the skipped states were never seen, so no event claims they were. A move between two
  statuses that share an event (NOT_START -> SUBMITTED) emits nothing. A step back is ignored.
- Progress only rises; `task.progress` only while IN_PROGRESS. A status change carries its progress
  in the task, so IN_PROGRESS "0%" -> "30%" across two polls is `task.started` then `task.progress`.
- imageUrl (previews, `?rand=`), buttons, properties and every other field are never compared.
- An unknown status is recorded while the task has no known status (no event); once a known status
  was seen an unknown one ranks below everything, like a step back. Never a crash.
- `task.stalled` once per stall: an unfinished task unchanged for `stall_after` seconds. The next
  change re-arms it.
- `task.vanished` when an unfinished task is in `snapshot.missing` on two consecutive looks; being
  seen again resets the count. Tasks absent from the snapshot but not in `missing` are left alone.
- Event ids come from `event_id(source, task id, type, status, progress)` of the task as sent
  (stalls add the time the stall began), so re-detecting a change after a crash yields the same id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.models import (
    STATUS_RANK,
    TERMINAL,
    Event,
    EventType,
    Snapshot,
    TaskState,
    event_id,
    iso,
)

__all__ = ["DiffResult", "Snapshot", "TaskState", "diff", "progress_value"]


@dataclass(frozen=True, slots=True)
class DiffResult:
    events: list[Event]
    changed: dict[str, TaskState]  # only the states that changed: what the store must write


# Plain-str keys (the shared tables use StrEnum members): the lookups below run once per task.
_RANK: dict[str, int] = {str(k): v for k, v in STATUS_RANK.items()}
_TERMINAL: frozenset[str] = frozenset(str(s) for s in TERMINAL)
# One string object per known status, so 100k states do not hold 100k copies of "SUCCESS".
_INTERN: dict[str, str] = {s: s for s in _RANK}
_EVENT_OF: dict[str, str] = {
    "": EventType.SUBMITTED.value,
    "NOT_START": EventType.SUBMITTED.value,
    "SUBMITTED": EventType.SUBMITTED.value,
    "MODAL": EventType.MODAL.value,
    "IN_PROGRESS": EventType.STARTED.value,
    "SUCCESS": EventType.SUCCEEDED.value,
    "FAILURE": EventType.FAILED.value,
    "CANCEL": EventType.CANCELLED.value,
}
_PROGRESS_EVENT = EventType.PROGRESS.value
_STALLED = EventType.STALLED.value
_VANISHED = EventType.VANISHED.value
_VANISH_AFTER = 2  # consecutive looks by id that found nothing
_PROGRESS: dict[str, int] = {f"{i}%": i for i in range(101)} | {"": -1}


def progress_value(progress: object) -> int:
    """The upstream's progress as 0..100: "45%" -> 45, 45 -> 45; "", None or junk -> -1.
    Total: no value raises (normalize.py drops non-finite progress as junk before the diff)."""
    if isinstance(progress, str):
        known = _PROGRESS.get(progress)
        if known is not None:
            return known
        text = progress.strip().removesuffix("%").strip()
        try:
            value = float(text)
        except ValueError:
            return -1
    elif isinstance(progress, int | float) and not isinstance(progress, bool):
        try:
            value = float(progress)
        except OverflowError:  # an int beyond float's range
            return 100 if progress > 0 else -1
    else:
        return -1
    if value != value or value < 0:  # NaN or negative
        return -1
    return 100 if value >= 100 else int(value)  # inf included


def _progress_text(progress: int) -> str:
    return f"{progress}%" if progress >= 0 else ""


def _previous(state: TaskState) -> dict[str, Any]:
    return {"status": state.status, "progress": _progress_text(state.progress)}


class _Differ:
    """The slow path: tasks that are new, unfinished, or changed. Holds the per-call context."""

    __slots__ = ("changed", "events", "now", "silent", "source", "stall_after", "time")

    def __init__(self, source: str, now: float, stall_after: float | None, silent: bool) -> None:
        self.source = source
        self.now = now
        self.time = datetime.fromtimestamp(now, UTC)
        self.stall_after = stall_after
        self.silent = silent
        self.events: list[Event] = []
        self.changed: dict[str, TaskState] = {}

    def emit(
        self,
        type_: str,
        tid: str,
        task: dict[str, Any],
        previous: TaskState | None,
        *id_state: object,
        data: dict[str, Any] | None = None,
    ) -> None:
        if self.silent:
            return
        self.events.append(
            Event(
                id=event_id(self.source, tid, type_, *id_state),
                type=type_,
                source=self.source,
                subject=tid,
                time=self.time,
                task=task,
                previous=None if previous is None else _previous(previous),
                data=data or {},
            )
        )

    def observe(self, task: dict[str, Any], prev: TaskState | None) -> None:
        tid: str = task["id"]
        cur = self.changed.get(tid, prev)  # the same id twice in one snapshot: the later wins
        if cur is not None and cur.finished:
            return
        raw_status = task.get("status")
        status = raw_status if isinstance(raw_status, str) else str(raw_status or "")
        status = _INTERN.get(status, status)
        rank = _RANK.get(status, -1)
        raw_progress = task.get("progress")
        progress = _PROGRESS.get(raw_progress, -2) if isinstance(raw_progress, str) else -2
        if progress == -2:
            progress = progress_value(raw_progress)
        now = self.now

        if cur is None:
            self.changed[tid] = TaskState(status, progress, now, finished=status in _TERMINAL)
            if rank >= 0:
                self.emit(_EVENT_OF[status], tid, task, None, status, progress)
            return

        old_rank = _RANK.get(cur.status, -1)
        if rank > old_rank or (rank == old_rank == -1 and status != cur.status):
            self.changed[tid] = TaskState(
                status, max(progress, cur.progress), now, finished=status in _TERMINAL
            )
            type_ = _EVENT_OF.get(status)
            if type_ is not None and type_ != _EVENT_OF.get(cur.status):
                self.emit(type_, tid, task, cur, status, progress)
            return
        if rank == old_rank and progress > cur.progress:
            self.changed[tid] = TaskState(cur.status, progress, now)
            if cur.status == "IN_PROGRESS":
                self.emit(_PROGRESS_EVENT, tid, task, cur, cur.status, progress)
            return

        # No change the bridge reports (same state, a step back, or only other fields changed).
        missing = cur.missing
        stalled = cur.stalled
        if (
            self.stall_after is not None
            and not stalled
            and not self.silent
            and now - cur.changed_at >= self.stall_after
        ):
            stalled = True
            self.emit(
                _STALLED,
                tid,
                task,
                None,
                cur.status,
                cur.progress,
                cur.changed_at,
                data={"since": iso(datetime.fromtimestamp(cur.changed_at, UTC))},
            )
        if missing or stalled != cur.stalled:
            self.changed[tid] = TaskState(cur.status, cur.progress, cur.changed_at, stalled)

    def gone(self, tid: str, prev: TaskState | None) -> None:
        cur = self.changed.get(tid, prev)
        if cur is None or cur.finished:
            return
        looks = cur.missing + 1
        if looks < _VANISH_AFTER:
            self.changed[tid] = TaskState(
                cur.status, cur.progress, cur.changed_at, cur.stalled, looks
            )
            return
        self.changed[tid] = TaskState(
            cur.status, cur.progress, self.now, cur.stalled, looks, finished=True
        )
        self.emit(_VANISHED, tid, {"id": tid}, cur, cur.status, cur.progress)


def diff(
    source: str,
    previous: Mapping[str, TaskState],
    snapshot: Snapshot,
    *,
    now: float,
    stall_after: float | None = None,
    silent: bool = False,
) -> DiffResult:
    """Compare one snapshot with the states the bridge holds. `silent=True` (first contact with
    `backfill: false`) records the states and emits nothing. `previous` is not modified."""
    differ = _Differ(source, now, stall_after, silent)
    get = previous.get
    observe = differ.observe
    # The hot loop: most tasks of a list are finished and are skipped after two lookups.
    for task in snapshot.tasks:
        prev = get(task["id"])
        if prev is None or not prev.finished:
            observe(task, prev)
    if snapshot.missing:
        listed = {task["id"] for task in snapshot.tasks}
        for tid in sorted(snapshot.missing - listed):
            differ.gone(tid, get(tid))
    return DiffResult(differ.events, differ.changed)

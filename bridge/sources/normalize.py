"""Normalisation: the upstream's bytes -> the task dicts the diff reads. Pure.
Pipeline: source -> **normalise** -> snapshot -> diff.

The quirks of the real servers (docs reference, sections 4 and 5), and what happens to them:

- `status: null` (and a fresh new-api row's `""`) becomes `""`, which ranks as NOT_START; a status
  that is not a string (never seen, but cheap to survive) becomes its text.
- A status longer than MAX_STATUS_CHARS drops the row (it would be kept in the task's state).
- A numeric `id` becomes its text; a task without a usable id (none, empty, not a string or number,
  longer than MAX_ID_CHARS) is dropped with a reason (what a drop means for a poll, a lookup and
  the probe is poll.py's call: never "the task is gone").
- `progress` stays as sent: FAILURE `""` (midjourney-proxy) and FAILURE `"100%"` (new-api) never
  produce progress events because the diff reads progress only while IN_PROGRESS. A progress that
  is a number but not a finite one (`"Infinity%"`, `"1e999"`, `"nan"`) drops the row: no rank of
  the task can be trusted from it.
- `unstorable()` says why a task that is about to become an event cannot be stored or sent
  (nested deeper than MAX_DEPTH, larger than MAX_TASK_BYTES); the watcher drops such rows too.
- `imageUrl` stays as sent (previews while running, new-api's `?rand=<ns>`); the diff never compares
  it, nor buttons, properties or any unknown field, which are all kept untouched.

Normalisation works in place on the freshly parsed dicts: no task is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.errors import SourceError

__all__ = [
    "Body",
    "Dropped",
    "Normalized",
    "normalize_task",
    "normalize_tasks",
    "parse_task_list",
    "parse_tasks",
    "unstorable",
]

Body = bytes | bytearray  # an answer as read (poll.py reads large ones into a bytearray)
MAX_ID_CHARS = 256  # real ids are 16-19 digits (midjourney-proxy) or a short prefixed token
# Real statuses are at most 11 characters; a task's status is kept in its stored state, so an
# unbounded one would let an upstream grow the database without a single event.
MAX_STATUS_CHARS = 64
# orjson encodes at most 254 levels, and an event wraps its task in two more (`data.task`).
MAX_DEPTH = 252
MAX_TASK_BYTES = 1024 * 1024  # one task as JSON; real ones are a few KiB
_FINE_PROGRESS = frozenset({*(f"{i}%" for i in range(101)), ""})


@dataclass(frozen=True, slots=True)
class Dropped:
    """One item of the upstream's list the bridge could not use, and why."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Normalized:
    tasks: list[dict[str, Any]]
    dropped: list[Dropped] = field(default_factory=list)
    # Rows left out because they did not change and the bridge holds them as finished (spans.py).
    unchanged: int = 0

    @property
    def rows(self) -> int:
        return len(self.tasks) + len(self.dropped) + self.unchanged


def parse_task_list(body: Body) -> list[dict[str, Any]]:
    """The body of /mj/task/list or /mj/task/list-by-condition: a JSON array of task objects.
    Raises SourceError("bad_payload") for an empty, truncated or malformed body or the wrong
    shape (an object instead of an array, items that are not objects)."""
    data = _load_array(body)
    for index, item in enumerate(data):
        if type(item) is not dict:
            raise _not_an_object(index, item)
    return data


def parse_tasks(body: Body) -> Normalized:
    """`parse_task_list` and `normalize_tasks` in one pass over the list (the poller's hot path);
    an item that is not an object is a bad payload here, not a dropped task."""
    return normalize_tasks(_load_array(body), strict=True)


def _load_array(body: Body) -> list[Any]:
    if not body or body.isspace():
        raise SourceError("bad_payload", "the response body is empty, expected a JSON array")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SourceError(
            "bad_payload",
            f"the response is not valid JSON (truncated or malformed, {len(body)} bytes): {exc}",
        ) from exc
    if type(data) is not list:
        raise SourceError(
            "bad_payload", f"expected a JSON array of tasks, got a JSON {_kind(data)}"
        )
    return data


def _not_an_object(index: int, item: object) -> SourceError:
    return SourceError(
        "bad_payload",
        f"expected a JSON array of task objects, item {index} is a JSON {_kind(item)}",
    )


def _kind(value: object) -> str:
    match value:
        case dict():
            return "object"
        case list():
            return "array"
        case str():
            return "string"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case None:
            return "null"
    return type(value).__name__


def _unusable_id(task: dict[str, Any]) -> str | None:
    """Fixes a numeric id in place; returns why the id is unusable, or None when it is fine."""
    tid = task.get("id")
    if isinstance(tid, str):
        if len(tid) > MAX_ID_CHARS:
            return f"id longer than {MAX_ID_CHARS} characters"
        return None if tid else "empty id"
    if isinstance(tid, int) and not isinstance(tid, bool):
        task["id"] = str(tid)
        return None
    if tid is None:
        return "no id"
    return f"id is a JSON {_kind(tid)}"


def _bad_progress(progress: object) -> str | None:
    """Why the progress cannot be read as a rank of the task, or None (junk text such as "abc"
    is simply unknown progress; a number that is not finite is junk)."""
    if isinstance(progress, float):
        value = progress
    elif isinstance(progress, str):
        try:
            value = float(progress.strip().removesuffix("%"))
        except ValueError:
            return None
    else:
        return None
    return None if math.isfinite(value) else "progress is not a finite number"


def normalize_task(task: dict[str, Any]) -> dict[str, Any]:
    """Normalise one task in place and return it; ValueError(reason) when it has no usable id
    or a progress that is not a finite number."""
    reason = _unusable_id(task) or _bad_progress(task.get("progress"))
    if reason is not None:
        raise ValueError(reason)
    status = task.get("status")
    if not isinstance(status, str):
        status = task["status"] = "" if status is None else str(status)
    if len(status) > MAX_STATUS_CHARS:
        raise ValueError(f"status longer than {MAX_STATUS_CHARS} characters")
    return task


def normalize_tasks(items: list[Any], *, strict: bool = False) -> Normalized:
    """Normalise a parsed list in place; items without a usable id are dropped with a reason, and
    so are items that are not objects (with `strict`, those raise SourceError instead)."""
    tasks: list[dict[str, Any]] = []
    dropped: list[Dropped] = []
    append = tasks.append
    for index, task in enumerate(items):
        # Fast path, the shape of nearly every task: a dict with a str id, a str status and a
        # progress such as "45%".
        if type(task) is dict:
            tid = task.get("id")
            progress = task.get("progress")
            if (
                type(tid) is str
                and tid
                and len(tid) <= MAX_ID_CHARS
                and type(status := task.get("status")) is str
                and len(status) <= MAX_STATUS_CHARS
                and type(progress) is str
                and progress in _FINE_PROGRESS
            ):
                append(task)
                continue
            try:
                append(normalize_task(task))
            except ValueError as exc:
                dropped.append(Dropped(index, str(exc)))
        elif strict:
            raise _not_an_object(index, task)
        else:
            dropped.append(Dropped(index, f"item is a JSON {_kind(task)}, not an object"))
    return Normalized(tasks, dropped)


def unstorable(task: dict[str, Any]) -> str | None:
    """Why this task cannot be stored and sent as an event's `data.task`, or None. Run on the
    tasks that become events only (a few per poll), not on every row: it encodes the task."""
    try:
        # Wrapped as the event wraps it, so the store's encoding of the event cannot fail.
        size = len(orjson.dumps({"data": {"task": task}}))
    except TypeError:  # orjson's recursion limit, or a value it cannot encode
        return f"nested deeper than {MAX_DEPTH} levels"
    if size > MAX_TASK_BYTES:
        return f"larger than {MAX_TASK_BYTES // 1024} KiB as JSON"
    return None

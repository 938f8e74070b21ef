"""The diff's rules as tables, and its invariants as hypothesis properties."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.diff import Snapshot, TaskState, diff, progress_value
from bridge.models import STATUS_RANK, event_id

TERMINAL_EVENTS = {"task.succeeded", "task.failed", "task.cancelled", "task.vanished"}


def task(status: str | None, progress: Any = "", tid: str = "1", **extra: Any) -> dict[str, Any]:
    return {"id": tid, "status": status, "progress": progress, **extra}


def run(
    snapshots: list[Snapshot], *, stall_after: float | None = None, step: float = 1.0
) -> tuple[list[list[str]], dict[str, TaskState]]:
    """Feed snapshots one second apart; the event types of each step and the final states."""
    states: dict[str, TaskState] = {}
    steps: list[list[str]] = []
    for i, snapshot in enumerate(snapshots):
        result = diff("mj", states, snapshot, now=1000.0 + i * step, stall_after=stall_after)
        states = {**states, **result.changed}
        steps.append([e.type for e in result.events])
    return steps, states


def snaps(*tasks: dict[str, Any]) -> list[Snapshot]:
    return [Snapshot([t]) for t in tasks]


URL = "https://cdn.example/a.webp"
RULES: list[tuple[str, list[dict[str, Any]], list[list[str]]]] = [
    ("first seen NOT_START", [task("NOT_START")], [["task.submitted"]]),
    ("first seen empty status (new-api)", [task("", "0%")], [["task.submitted"]]),
    ("first seen null status", [task(None)], [["task.submitted"]]),
    ("first seen SUBMITTED", [task("SUBMITTED", "0%")], [["task.submitted"]]),
    ("first seen MODAL", [task("MODAL")], [["task.modal"]]),
    ("first seen IN_PROGRESS", [task("IN_PROGRESS", "45%")], [["task.started"]]),
    ("first seen SUCCESS", [task("SUCCESS", "100%")], [["task.succeeded"]]),
    ("first seen FAILURE", [task("FAILURE", "")], [["task.failed"]]),
    ("first seen CANCEL", [task("CANCEL")], [["task.cancelled"]]),
    ("first seen unknown status", [task("PAUSED", "3%")], [[]]),
    (
        "a whole life",
        [
            task("NOT_START", None),
            task("SUBMITTED", "0%"),
            task("IN_PROGRESS", "10%"),
            task("IN_PROGRESS", "45%"),
            task("SUCCESS", "100%"),
        ],
        [["task.submitted"], [], ["task.started"], ["task.progress"], ["task.succeeded"]],
    ),
    (
        "a jump emits only the new state's event",
        [task("SUBMITTED", "0%"), task("SUCCESS", "100%")],
        [["task.submitted"], ["task.succeeded"]],
    ),
    (
        "a step back is ignored",
        [task("IN_PROGRESS", "45%"), task("SUBMITTED", "0%"), task("IN_PROGRESS", "45%")],
        [["task.started"], [], []],
    ),
    (
        "a finished task never emits again",
        [
            task("SUCCESS", "100%"),
            task("FAILURE", ""),
            task("IN_PROGRESS", "50%"),
            task("CANCEL"),
        ],
        [["task.succeeded"], [], [], []],
    ),
    (
        "progress only rises",
        [task("IN_PROGRESS", "45%"), task("IN_PROGRESS", "30%"), task("IN_PROGRESS", "50%")],
        [["task.started"], [], ["task.progress"]],
    ),
    (
        "the same progress emits nothing",
        [task("IN_PROGRESS", "45%"), task("IN_PROGRESS", "45%")],
        [["task.started"], []],
    ),
    (
        "progress outside IN_PROGRESS emits nothing",
        [task("SUBMITTED", "0%"), task("SUBMITTED", "5%")],
        [["task.submitted"], []],
    ),
    (
        "progress that is not a percentage emits nothing",
        [task("IN_PROGRESS", "45%"), task("IN_PROGRESS", "stopped"), task("IN_PROGRESS", None)],
        [["task.started"], [], []],
    ),
    (
        'new-api FAILURE with "100%"',
        [task("IN_PROGRESS", "45%"), task("FAILURE", "100%")],
        [["task.started"], ["task.failed"]],
    ),
    (
        'midjourney-proxy FAILURE with ""',
        [task("IN_PROGRESS", "45%"), task("FAILURE", "")],
        [["task.started"], ["task.failed"]],
    ),
    (
        "preview and ?rand= imageUrl changes alone emit nothing",
        [
            task("IN_PROGRESS", "45%", imageUrl=URL),
            task("IN_PROGRESS", "45%", imageUrl=URL + "?rand=1748339029401828"),
            task("IN_PROGRESS", "45%", imageUrl="https://cdn.example/b.webp"),
        ],
        [["task.started"], [], []],
    ),
    (
        "buttons and properties alone emit nothing",
        [
            task("IN_PROGRESS", "45%", buttons=[], properties={}),
            task("IN_PROGRESS", "45%", buttons=[{"label": "U1"}], properties={"flags": 0}),
        ],
        [["task.started"], []],
    ),
    (
        "an unknown status after a known one is ignored",
        [
            task("IN_PROGRESS", "45%"),
            task("PAUSED", "45%"),
            task("IN_PROGRESS", "45%"),
            task("SUCCESS", "100%"),
        ],
        [["task.started"], [], [], ["task.succeeded"]],
    ),
    (
        "an unknown status first, then a known one",
        [task("QUEUED"), task("WAITING"), task("IN_PROGRESS", "5%")],
        [[], [], ["task.started"]],
    ),
    (
        "new-api fresh row, then SUBMITTED, then running",
        [task("", "0%"), task("SUBMITTED", "0%"), task("IN_PROGRESS", "10%")],
        [["task.submitted"], [], ["task.started"]],
    ),
    (
        "MODAL answered, then submitted",
        [task("MODAL"), task("SUBMITTED", "0%")],
        [["task.modal"], ["task.submitted"]],
    ),
    (
        "CANCEL after running",
        [task("IN_PROGRESS", "20%"), task("CANCEL", "20%")],
        [["task.started"], ["task.cancelled"]],
    ),
]


@pytest.mark.parametrize(("tasks", "expected"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rules(tasks: list[dict[str, Any]], expected: list[list[str]]) -> None:
    steps, _ = run(snaps(*tasks))
    assert steps == expected


def test_event_carries_task_previous_time_and_deterministic_id() -> None:
    states = diff("mj", {}, Snapshot([task("IN_PROGRESS", "45%")]), now=10.0).changed
    sent = task("SUCCESS", "100%", imageUrl=URL, extra_field={"kept": True})
    (event,) = diff("mj", states, Snapshot([sent]), now=20.0).events
    assert event.type == "task.succeeded"
    assert event.source == "mj"
    assert event.subject == "1"
    assert event.task is sent
    assert event.previous == {"status": "IN_PROGRESS", "progress": "45%"}
    assert event.time == datetime.fromtimestamp(20.0, UTC)
    assert event.id == event_id("mj", "1", "task.succeeded", "SUCCESS", 100)
    again = diff("mj", states, Snapshot([dict(sent)]), now=99.0).events
    assert [e.id for e in again] == [event.id]
    first = diff("mj", {}, Snapshot([task("IN_PROGRESS", "45%")]), now=10.0).events
    assert first[0].previous is None


def test_unknown_progress_shows_as_empty_in_previous() -> None:
    states = diff("mj", {}, Snapshot([task("NOT_START", None)]), now=1.0).changed
    (event,) = diff("mj", states, Snapshot([task("IN_PROGRESS", "1%")]), now=2.0).events
    assert event.previous == {"status": "NOT_START", "progress": ""}


def test_the_same_snapshot_twice_changes_nothing() -> None:
    snapshot = Snapshot([task("IN_PROGRESS", "45%", tid=str(i)) for i in range(5)])
    states = diff("mj", {}, snapshot, now=1.0).changed
    again = diff("mj", states, snapshot, now=2.0)
    assert again.events == []
    assert again.changed == {}


def test_silent_records_states_and_emits_nothing() -> None:
    snapshot = Snapshot([task("IN_PROGRESS", "45%", tid="a"), task("SUCCESS", "100%", tid="b")])
    first = diff("mj", {}, snapshot, now=1.0, silent=True, stall_after=0.0)
    assert first.events == []
    assert first.changed["a"] == TaskState("IN_PROGRESS", 45, 1.0)
    assert first.changed["b"].finished
    later = Snapshot([task("IN_PROGRESS", "60%", tid="a"), task("SUCCESS", "100%", tid="b")])
    assert [e.type for e in diff("mj", first.changed, later, now=2.0).events] == ["task.progress"]


def test_previous_is_not_modified() -> None:
    previous = {"1": TaskState("IN_PROGRESS", 10, 1.0)}
    diff("mj", previous, Snapshot([task("SUCCESS", "100%")]), now=2.0)
    assert previous == {"1": TaskState("IN_PROGRESS", 10, 1.0)}


def test_the_same_id_twice_in_one_snapshot_emits_once() -> None:
    snapshot = Snapshot([task("SUCCESS", "100%"), task("SUCCESS", "100%")])
    result = diff("mj", {}, snapshot, now=1.0)
    assert [e.type for e in result.events] == ["task.succeeded"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("45%", 45),
        ("0%", 0),
        ("100%", 100),
        (" 7 % ", 7),
        ("45.5%", 45),
        (45, 45),
        (12.9, 12),
        ("250%", 100),
        ("", -1),
        (None, -1),
        ("stopped", -1),
        ("-5%", -1),
        ("nan%", -1),
        ("Infinity%", 100),
        ("1e999", 100),
        ("-inf", -1),
        (float("inf"), 100),
        (10**400, 100),
        (True, -1),
        ([45], -1),
    ],
    ids=repr,
)
def test_progress_value(value: object, expected: int) -> None:
    assert progress_value(value) == expected


# --- task.stalled ---------------------------------------------------------------------------------


def test_stalled_once_per_stall_and_rearmed_by_a_change() -> None:
    running = task("IN_PROGRESS", "45%")
    sequence = [running, running, running, running, task("IN_PROGRESS", "60%"), running, running]
    steps, _ = run(snaps(*sequence), stall_after=2.0)
    assert steps == [
        ["task.started"],
        [],
        ["task.stalled"],
        [],
        ["task.progress"],  # the change re-arms it ("45%" after "60%" is not a change)
        [],
        ["task.stalled"],
    ]


def test_stalled_event_id_and_data() -> None:
    states = diff("mj", {}, Snapshot([task("SUBMITTED", "0%")]), now=100.0).changed
    snapshot = Snapshot([task("SUBMITTED", "0%")])
    (event,) = diff("mj", states, snapshot, now=800.0, stall_after=600).events
    assert event.type == "task.stalled"
    assert event.id == event_id("mj", "1", "task.stalled", "SUBMITTED", 0, 100.0)
    assert event.data == {"since": "1970-01-01T00:01:40.000Z"}
    assert event.previous is None


@pytest.mark.parametrize(
    ("status", "stall_after"),
    [("SUCCESS", 1.0), ("FAILURE", 1.0), ("IN_PROGRESS", None)],
    ids=["finished SUCCESS", "finished FAILURE", "stall_after off"],
)
def test_not_stalled(status: str, stall_after: float | None) -> None:
    steps, _ = run(snaps(*[task(status, "50%")] * 5), stall_after=stall_after)
    assert not any("task.stalled" in s for s in steps)


# --- task.vanished --------------------------------------------------------------------------------


def test_vanished_after_two_consecutive_looks() -> None:
    gone = Snapshot([], missing=frozenset({"1"}))
    steps, states = run([Snapshot([task("IN_PROGRESS", "45%")]), gone, gone, gone])
    assert steps == [["task.started"], [], ["task.vanished"], []]
    assert states["1"].finished


def test_vanished_event() -> None:
    states = {"1": TaskState("IN_PROGRESS", 45, 1.0, missing=1)}
    (event,) = diff("mj", states, Snapshot([], missing=frozenset({"1"})), now=5.0).events
    assert event.type == "task.vanished"
    assert event.task == {"id": "1"}
    assert event.previous == {"status": "IN_PROGRESS", "progress": "45%"}
    assert event.id == event_id("mj", "1", "task.vanished", "IN_PROGRESS", 45)


def test_being_seen_again_resets_the_missing_count() -> None:
    running = Snapshot([task("IN_PROGRESS", "45%")])
    gone = Snapshot([], missing=frozenset({"1"}))
    steps, states = run([running, gone, running, gone, running])
    assert steps == [["task.started"], [], [], [], []]
    assert states["1"].missing == 0
    assert not states["1"].finished


@pytest.mark.parametrize(
    "snapshots",
    [
        [Snapshot([task("SUCCESS", "100%")])] + [Snapshot([], missing=frozenset({"1"}))] * 3,
        [Snapshot([], missing=frozenset({"1"}))] * 3,
        [Snapshot([task("IN_PROGRESS", "45%")])] + [Snapshot([])] * 3,
        [Snapshot([task("IN_PROGRESS", "45%")])] + [Snapshot([], complete=False)] * 3,
        [Snapshot([task("IN_PROGRESS", "45%")])]
        + [Snapshot([task("IN_PROGRESS", "45%")], missing=frozenset({"1"}))] * 3,
    ],
    ids=[
        "finished tasks do not vanish",
        "untracked ids are ignored",
        "absent but not missing is left alone",
        "absent from a push is left alone",
        "listed wins over missing",
    ],
)
def test_not_vanished(snapshots: list[Snapshot]) -> None:
    steps, _ = run(snapshots)
    assert not any("task.vanished" in s for s in steps)


# --- properties -----------------------------------------------------------------------------------

IDS = ["a", "b", "c"]
STATUSES = ["", None, "NOT_START", "MODAL", "SUBMITTED", "IN_PROGRESS", "SUCCESS", "FAILURE"]
STATUSES += ["CANCEL", "PAUSED"]
PROGRESS = st.one_of(
    st.sampled_from(["", None, "0%", "100%", "junk"]),
    st.integers(0, 100).map(lambda n: f"{n}%"),
)
TASK = st.builds(task, st.sampled_from(STATUSES), PROGRESS, st.sampled_from(IDS))
SNAPSHOT = st.builds(
    Snapshot,
    st.lists(TASK, max_size=4),
    st.frozensets(st.sampled_from(IDS), max_size=2),
    st.booleans(),
)
SEQUENCE = st.lists(st.tuples(SNAPSHOT, st.floats(0, 50)), min_size=1, max_size=12)


def play(
    sequence: list[tuple[Snapshot, float]], stall_after: float | None = 30.0
) -> list[tuple[dict[str, TaskState], Any, dict[str, TaskState]]]:
    """Every step as (states before, result, states after)."""
    states: dict[str, TaskState] = {}
    now = 0.0
    history = []
    for snapshot, gap in sequence:
        now += gap
        result = diff("mj", states, snapshot, now=now, stall_after=stall_after)
        after = {**states, **result.changed}
        history.append((states, result, after))
        states = after
    return history


def known_rank(state: TaskState) -> int:
    return STATUS_RANK.get(state.status, -1)


@settings(max_examples=300, deadline=None)
@given(SEQUENCE)
def test_at_most_one_terminal_event_and_nothing_after_it(
    sequence: list[tuple[Snapshot, float]],
) -> None:
    finished: set[str] = set()
    for _, result, _ in play(sequence):
        for event in result.events:
            assert event.subject not in finished, f"{event.type} after the end of {event.subject}"
            if event.type in TERMINAL_EVENTS:
                finished.add(event.subject)


@settings(max_examples=300, deadline=None)
@given(SEQUENCE)
def test_ranks_and_progress_never_fall(sequence: list[tuple[Snapshot, float]]) -> None:
    for before, _, after in play(sequence):
        for tid, old in before.items():
            new = after[tid]
            assert known_rank(new) >= known_rank(old)
            assert new.progress >= old.progress or new.status != old.status
            assert new.finished or not old.finished


@settings(max_examples=300, deadline=None)
@given(SEQUENCE, SNAPSHOT)
def test_the_same_snapshot_twice_emits_nothing(
    sequence: list[tuple[Snapshot, float]], snapshot: Snapshot
) -> None:
    states = play(sequence)[-1][2]
    once = Snapshot(snapshot.tasks)  # missing ids count looks, so a repeat with them may vanish
    states = {**states, **diff("mj", states, once, now=1000.0, stall_after=30).changed}
    again = diff("mj", states, once, now=1000.0, stall_after=30)
    assert again.events == []
    assert again.changed == {}


@settings(max_examples=300, deadline=None)
@given(SEQUENCE)
def test_event_ids_are_deterministic_and_unique(sequence: list[tuple[Snapshot, float]]) -> None:
    first = [e.id for _, r, _ in play(sequence) for e in r.events]
    second = [e.id for _, r, _ in play(sequence) for e in r.events]
    assert first == second
    assert len(set(first)) == len(first), "two different changes under one id: one would be lost"


@settings(max_examples=300, deadline=None)
@given(SEQUENCE)
def test_stalled_at_most_once_per_stall(sequence: list[tuple[Snapshot, float]]) -> None:
    stalls: set[tuple[str, Any]] = set()
    for before, result, _ in play(sequence, stall_after=10.0):
        for event in result.events:
            if event.type == "task.stalled":
                key = (event.subject, before[event.subject].changed_at)
                assert key not in stalls
                stalls.add(key)

"""The split read of a task list (spans.py) gives what a full parse gives, for any array: hostile
strings (brackets, quotes, escapes, the separator itself), whitespace between the tokens, invalid
JSON (which fails exactly as a full parse does), and a second read that skips only the unchanged
tasks the bridge holds as finished."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import SourceError
from bridge.sources import spans as spans_module
from bridge.sources.normalize import parse_tasks
from bridge.sources.spans import ListSpans

HOSTILE = st.sampled_from(
    ['},{"id":', '"}]', "\\", '\\"', "[{", "}]", '},{"id":"x"}', "\u2028", "é", "", " , "]
)
TEXT = st.one_of(HOSTILE, st.text(max_size=12), st.lists(HOSTILE, max_size=4).map("".join))
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
TASK = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=6), st.integers(0, 99), st.none(), HOSTILE),
        "status": st.sampled_from(["SUCCESS", "IN_PROGRESS", "FAILURE", "", None, "x" * 70]),
        "progress": st.sampled_from(["100%", "40%", "", "abc", "Infinity%"]),
    },
    optional={"extra": VALUE, "buttons": st.lists(st.dictionaries(TEXT, VALUE, max_size=2))},
)
TASKS = st.lists(TASK, max_size=8)
LAYOUT = st.sampled_from(["compact", "spaced", "indent", "crlf"])


def render(tasks: list[dict[str, Any]], layout: str) -> bytes:
    if layout == "compact":
        return orjson.dumps(tasks)
    if layout == "spaced":
        return json.dumps(tasks, separators=(" , ", " : "), ensure_ascii=False).encode()
    if layout == "indent":
        return orjson.dumps(tasks, option=orjson.OPT_INDENT_2) + b"\n"
    return b"\r\n\t" + json.dumps(tasks, indent="\t").replace("\n", "\r\n").encode() + b" \r\n"


def full(body: bytes) -> tuple[list[dict[str, Any]], list[tuple[int, str]]] | str:
    try:
        result = parse_tasks(body)
    except SourceError as exc:
        return exc.reason
    return result.tasks, [(d.index, d.reason) for d in result.dropped]


def split(spans: ListSpans, body: bytes, settled: Any = lambda tid: False) -> Any:
    try:
        result = spans.parse(body, settled)
    except SourceError as exc:
        return exc.reason
    return result.tasks, [(d.index, d.reason) for d in result.dropped]


@settings(max_examples=300, deadline=None)
@given(TASKS, LAYOUT)
def test_a_split_read_equals_a_full_parse(tasks: list[dict[str, Any]], layout: str) -> None:
    body = render(tasks, layout)
    assert split(ListSpans(), body) == full(body)
    assert split(ListSpans(), bytearray(body)) == full(body)  # as poll.py reads an answer


@settings(max_examples=200, deadline=None)
@given(TASKS, LAYOUT, st.integers(0, 400), st.binary(max_size=3))
def test_invalid_json_fails_as_a_full_parse_does(
    tasks: list[dict[str, Any]], layout: str, cut: int, junk: bytes
) -> None:
    body = render(tasks, layout)
    broken = body[: cut % (len(body) + 1)] + junk
    spans = ListSpans()
    spans.parse(body, lambda tid: False)  # a previous read, so some spans are known
    assert split(spans, broken, lambda tid: True) == full(broken)


@settings(max_examples=200, deadline=None)
@given(TASKS, TASKS, LAYOUT, st.data())
def test_a_second_read_skips_only_unchanged_settled_tasks(
    first: list[dict[str, Any]], extra: list[dict[str, Any]], layout: str, data: st.DataObject
) -> None:
    spans = ListSpans()
    before = render(first, layout)
    split(spans, before)
    # The next list: some of the old tasks kept byte for byte, some new or changed ones.
    kept = data.draw(st.lists(st.sampled_from(first), max_size=8)) if first else []
    after = render([*extra, *kept], layout)
    settled_ids = data.draw(st.sets(st.text(max_size=6) | st.sampled_from(["0", "1", "x"])))
    expected = full(after)
    got = split(spans, after, settled_ids.__contains__)
    if isinstance(expected, str):
        assert got == expected
        return
    tasks, dropped = expected
    got_tasks, got_dropped = got
    assert got_dropped == dropped
    # Every task the split read left out is one a full parse has, held as finished, unchanged.
    assert all(task in tasks for task in got_tasks)
    left_out = [task for task in tasks if task not in got_tasks]
    assert all(task["id"] in settled_ids for task in left_out)
    # ... and one the previous read had, as it normalised it (an id 0 became "0").
    previous = full(before)
    assert all(task in previous[0] for task in left_out) if left_out else True
    # Nothing that is not settled is ever left out.
    assert [t for t in tasks if t["id"] not in settled_ids] == [
        t for t in got_tasks if t["id"] not in settled_ids
    ]


@settings(max_examples=150, deadline=None)
@given(TASKS, TASKS, LAYOUT, st.data())
def test_an_answer_read_in_place_or_span_by_span_gives_the_same_result(
    first: list[dict[str, Any]], extra: list[dict[str, Any]], layout: str, data: st.DataObject
) -> None:
    # Up to WHOLE_COPY an answer is hashed in place; past it, span by span from copies. The same
    # spans must hash alike either way: a source's answers move across the size now and then.
    before = render(first, layout)
    kept = data.draw(st.lists(st.sampled_from(first), max_size=8)) if first else []
    after = render([*extra, *kept], layout)
    settled = data.draw(st.sets(st.sampled_from(["0", "1", "x", "y"]))).__contains__
    results = []
    for whole_copy in (spans_module.WHOLE_COPY, 0):
        saved, spans_module.WHOLE_COPY = spans_module.WHOLE_COPY, whole_copy
        try:
            spans = ListSpans()
            for body in (bytearray(before), bytearray(after)):
                try:
                    result = spans.parse(body, settled)
                except SourceError as exc:
                    results.append(exc.reason)
                else:
                    results.append((result.tasks, result.dropped, result.unchanged))
        finally:
            spans_module.WHOLE_COPY = saved
    assert results[:2] == results[2:]


def test_unchanged_finished_tasks_are_not_parsed_again() -> None:
    tasks = [{"id": str(i), "status": "SUCCESS", "progress": "100%"} for i in range(5)]
    running = {"id": "r", "status": "IN_PROGRESS", "progress": "10%"}
    spans = ListSpans()
    first = spans.parse(orjson.dumps([running, *tasks]), lambda tid: False)
    assert len(first.tasks) == 6
    running["progress"] = "20%"
    second = spans.parse(orjson.dumps([running, *tasks]), lambda tid: tid != "r")
    assert second.tasks == [running]
    assert (second.unchanged, second.rows) == (5, 6)
    # Not held as finished (say its commit failed): parsed again, though its bytes are the same.
    third = spans.parse(orjson.dumps([running, *tasks]), lambda tid: tid not in ("r", "3"))
    assert [t["id"] for t in third.tasks] == ["r", "3"]
    assert spans.fallbacks == 0


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"  []  ",
        b'[{"id":"1"},]',
        b'[{"id":"1"}',
        b"{}",
        b"",
        b"\x0c[{}]",
        b'[{"a\\u0041":1}]',
    ],
)
def test_unexpected_shapes_fall_back_to_a_full_parse(body: bytes) -> None:
    assert split(ListSpans(), body) == full(body)

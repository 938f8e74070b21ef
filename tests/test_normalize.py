"""Normalisation of the real servers' quirks, one row per quirk, and the payload shape checks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridge.diff import Snapshot, diff
from bridge.errors import SourceError
from bridge.sources.normalize import (
    Dropped,
    normalize_task,
    normalize_tasks,
    parse_task_list,
    parse_tasks,
    unstorable,
)

NZ_FAILURE: dict[str, Any] = {
    "id": "1748340000000123",
    "properties": {"discordInstanceId": "1118138338562560102", "notifyHook": None},
    "action": "IMAGINE",
    "status": "FAILURE",
    "state": "order-42",
    "imageUrl": None,
    "progress": "",
    "failReason": "[Invalid parameter] Invalid aspect ratio",
    "buttons": [],
}

QUIRKS: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("null status becomes empty", {"id": "1", "status": None}, {"id": "1", "status": ""}),
    ("missing status becomes empty", {"id": "1"}, {"id": "1", "status": ""}),
    (
        "fresh new-api row keeps its empty status",
        {"id": "1", "status": "", "progress": "0%"},
        {"id": "1", "status": "", "progress": "0%"},
    ),
    ("numeric id becomes text", {"id": 1748339029401828, "status": "SUCCESS"}, None),
    ("numeric status becomes text", {"id": "1", "status": 3}, {"id": "1", "status": "3"}),
    ("upstream FAILURE with empty progress is untouched", NZ_FAILURE, NZ_FAILURE),
    (
        "new-api FAILURE with 100% is untouched",
        {"id": "1", "status": "FAILURE", "progress": "100%"},
        {"id": "1", "status": "FAILURE", "progress": "100%"},
    ),
    (
        "new-api ?rand= imageUrl is kept",
        {"id": "1", "status": "IN_PROGRESS", "imageUrl": "https://relay/mj/image/1?rand=17483"},
        {"id": "1", "status": "IN_PROGRESS", "imageUrl": "https://relay/mj/image/1?rand=17483"},
    ),
    (
        "trueai extra fields and unknown statuses are kept",
        {"id": "1", "status": "WEIRD", "botType": "NIJI_JOURNEY", "imageUrls": [{"url": "u"}]},
        {"id": "1", "status": "WEIRD", "botType": "NIJI_JOURNEY", "imageUrls": [{"url": "u"}]},
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [q[1:] for q in QUIRKS], ids=[q[0] for q in QUIRKS])
def test_quirks(raw: dict[str, Any], expected: dict[str, Any] | None) -> None:
    if expected is None:  # the numeric id case
        expected = {**raw, "id": str(raw["id"])}
    copy = orjson.loads(orjson.dumps(raw))
    assert normalize_task(copy) == expected
    assert normalize_tasks([orjson.loads(orjson.dumps(raw))]).tasks == [expected]
    assert parse_tasks(orjson.dumps([raw])).tasks == [expected]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"status": "SUCCESS"}, "no id"),
        ({"id": None, "status": "SUCCESS"}, "no id"),
        ({"id": "", "status": "SUCCESS"}, "empty id"),
        ({"id": ["1"], "status": "SUCCESS"}, "id is a JSON array"),
        ({"id": True}, "id is a JSON boolean"),
        ({"id": 1.5}, "id is a JSON number"),
    ],
    ids=["missing", "null", "empty", "array", "boolean", "float"],
)
def test_tasks_without_a_usable_id_are_dropped_with_a_reason(
    raw: dict[str, Any], reason: str
) -> None:
    good = {"id": "2", "status": "SUCCESS"}
    with pytest.raises(ValueError, match=reason):
        normalize_task(dict(raw))
    result = normalize_tasks([dict(raw), dict(good)])
    assert result.tasks == [good]
    assert result.dropped == [Dropped(0, reason)]
    assert parse_tasks(orjson.dumps([raw, good])).dropped == [Dropped(0, reason)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"id": "1", "progress": "Infinity%"}, "progress is not a finite number"),
        ({"id": "1", "progress": "inf"}, "progress is not a finite number"),
        ({"id": "1", "progress": "1e999"}, "progress is not a finite number"),
        ({"id": "1", "progress": "-Infinity"}, "progress is not a finite number"),
        ({"id": "1", "progress": " NaN %"}, "progress is not a finite number"),
        ({"id": "7" * 257, "status": "SUCCESS"}, "id longer than 256 characters"),
        ({"id": "1", "status": "S" * 65, "progress": "1%"}, "status longer than 64 characters"),
        ({"id": "1", "status": {"a": "b" * 70}}, "status longer than 64 characters"),
    ],
    ids=["Infinity%", "inf", "1e999", "-Infinity", "NaN", "long id", "long status", "odd status"],
)
def test_rows_the_bridge_cannot_rank_are_dropped(raw: dict[str, Any], reason: str) -> None:
    good = {"id": "2", "status": "SUCCESS", "progress": "100%"}
    result = normalize_tasks([dict(raw), dict(good)])
    assert result.tasks == [good]
    assert result.dropped == [Dropped(0, reason)]
    assert parse_tasks(orjson.dumps([raw, good])).dropped == [Dropped(0, reason)]


def test_odd_but_finite_progress_is_kept() -> None:
    rows = [{"id": str(i), "progress": p} for i, p in enumerate(["abc", None, 45, 1e300, "250%"])]
    assert len(normalize_tasks(rows).tasks) == 5


def test_unstorable_tasks() -> None:
    nested: Any = 1
    for _ in range(260):
        nested = {"a": nested}
    assert unstorable({"id": "1", "properties": nested}) == "nested deeper than 252 levels"
    assert unstorable({"id": "1", "prompt": "a" * 2_000_000}) == "larger than 1024 KiB as JSON"
    assert unstorable(dict(NZ_FAILURE)) is None


def test_normalize_tasks_drops_items_that_are_not_objects() -> None:
    result = normalize_tasks([1, {"id": "1", "status": "SUCCESS"}])
    assert result.dropped == [Dropped(0, "item is a JSON number, not an object")]


def test_normalisation_works_in_place() -> None:
    raw = {"id": "1", "status": None, "buttons": [{"label": "U1"}]}
    assert normalize_task(raw) is raw
    items: list[Any] = [{"id": "1", "status": "SUCCESS"}]
    assert normalize_tasks(items).tasks[0] is items[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b'[{"id":"1","status":"SUCC', "not valid JSON"),
        (b"[{'id': '1'}]", "not valid JSON"),
        (b"<!doctype html><html></html>", "not valid JSON"),
        (b'{"code":4,"description":"not found"}', "got a JSON object"),
        (b'"ok"', "got a JSON string"),
        (b"null", "got a JSON null"),
        (b'[{"id":"1"}, "2"]', "item 1 is a JSON string"),
        (b"[[]]", "item 0 is a JSON array"),
    ],
    ids=[
        "empty",
        "blank",
        "truncated",
        "malformed",
        "html",
        "object",
        "string",
        "null",
        "string item",
        "array item",
    ],
)
def test_bad_payloads(body: bytes, message: str) -> None:
    for parse in (parse_task_list, parse_tasks):
        with pytest.raises(SourceError, match=message) as caught:
            parse(body)
        assert caught.value.reason == "bad_payload"


def test_parse_task_list_accepts_an_empty_list_and_keeps_fields() -> None:
    assert parse_task_list(b"[]") == []
    assert parse_task_list(orjson.dumps([NZ_FAILURE])) == [NZ_FAILURE]


QUIRK_SEQUENCES = [
    (
        "new-api FAILURE 100% after running",
        [{"status": "IN_PROGRESS", "progress": "45%"}, {"status": "FAILURE", "progress": "100%"}],
        [["task.started"], ["task.failed"]],
    ),
    (
        "upstream FAILURE empty progress after running",
        [{"status": "IN_PROGRESS", "progress": "45%"}, {"status": "FAILURE", "progress": ""}],
        [["task.started"], ["task.failed"]],
    ),
    (
        "new-api fresh row then its first poll",
        [{"status": None, "progress": "0%"}, {"status": "SUBMITTED", "progress": "0%"}],
        [["task.submitted"], []],
    ),
    (
        "?rand= changes every read",
        [
            {"status": "IN_PROGRESS", "progress": "45%", "imageUrl": "https://r/mj/image/1?rand=1"},
            {"status": "IN_PROGRESS", "progress": "45%", "imageUrl": "https://r/mj/image/1?rand=2"},
        ],
        [["task.started"], []],
    ),
    (
        "preview imageUrl while running",
        [
            {"status": "IN_PROGRESS", "progress": "31%", "imageUrl": None},
            {"status": "IN_PROGRESS", "progress": "31%", "imageUrl": "https://cdn/preview.webp"},
        ],
        [["task.started"], []],
    ),
]


@pytest.mark.parametrize(
    ("rows", "expected"), [q[1:] for q in QUIRK_SEQUENCES], ids=[q[0] for q in QUIRK_SEQUENCES]
)
def test_quirks_through_the_diff(rows: list[dict[str, Any]], expected: list[list[str]]) -> None:
    states: dict[str, Any] = {}
    seen = []
    for i, row in enumerate(rows):
        tasks = parse_tasks(orjson.dumps([{"id": "1", **row}])).tasks
        result = diff("mj", states, Snapshot(tasks), now=float(i))
        states |= result.changed
        seen.append([e.type for e in result.events])
    assert seen == expected

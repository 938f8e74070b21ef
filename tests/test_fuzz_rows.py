"""Generated upstream rows, as a hostile or broken upstream would serve them, through a real poll
of a local server: parse, normalise, diff, rules with templates, store commit. The property: no
exception leaves the poll (a bad answer is a failed poll or skipped junk, never a crash), and
every poll ends (a generous bound that only a hang would reach). Nor may a poll fail with
reason `internal`, the net that catches what nobody foresaw."""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import Config
from bridge.diff import Snapshot
from bridge.errors import SourceError
from bridge.models import Event
from bridge.publish import Publisher
from bridge.rules import Router
from bridge.server.push import tasks_of
from bridge.sources.normalize import parse_tasks, unstorable
from bridge.sources.poll import TaskAPI
from bridge.store import Store
from bridge.watch import Watcher
from tests.hostile import HostileUpstream, deep

STATUSES = ["NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE", "CANCEL", ""]
PROGRESS = ["0%", "45%", "100%", "", "Infinity%", "inf", "-inf", "1e999", "nan", "NaN%", "7 %"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.one_of(
    st.text(string.digits, min_size=1, max_size=19),
    st.integers(0, 2**63 - 1),
    st.sampled_from([None, "", "x" * 300, 1.5, True, [1], {"id": 1}]),
    st.text(max_size=30),
)
rows = st.fixed_dictionaries(
    {"id": ids},
    optional={
        "status": st.one_of(st.sampled_from(STATUSES), st.text(max_size=12), scalars),
        "progress": st.one_of(st.sampled_from(PROGRESS), scalars),
        "prompt": st.one_of(st.text(max_size=200), st.just("{{ 7*7 }}{% for x in range(9) %}")),
        "failReason": st.text(max_size=50),
        "imageUrl": st.one_of(st.none(), st.text(max_size=80)),
        "submitTime": st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=10)),
        "finishTime": st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False)),
        "buttons": st.one_of(st.lists(json_values, max_size=3), scalars),
        "properties": st.one_of(json_values, st.integers(240, 320).map(deep)),
        "action": st.one_of(st.sampled_from(["IMAGINE", "UPSCALE"]), scalars),
    },
)
answers = st.one_of(
    st.lists(st.one_of(rows, json_values), max_size=8).map(lambda r: json.dumps(r).encode()),
    st.lists(rows, max_size=8).map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"[", b"{}", b"null", b'[{"id": "1"}', b"<html>", b"[" * 2000]),
)

TEMPLATE = (
    "{{ task.prompt | truncate(40) }} {{ task.progress }} {{ task | took }} "
    "{{ task.finishTime | localtime('Europe/Berlin') }} {{ task.properties | tojson | length }}"
)


class Rig:
    def __init__(self, watcher: Watcher, upstream: HostileUpstream, events: list[Event]) -> None:
        self.watcher = watcher
        self.upstream = upstream
        self.events = events


@pytest.fixture
async def rig(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Rig]:
    async with HostileUpstream() as up:
        config = Config.model_validate(
            {
                "sources": [{"name": "fuzz", "base_url": up.url, "mode": "list", "backfill": True}],
                "targets": {"chat": "json://127.0.0.1:9"},
                "rules": [{"name": "all", "on": "*", "to": "chat", "body": TEMPLATE}],
            }
        )
        async with await Store.open(str(tmp_path / "fuzz.db")) as store:
            events: list[Event] = []
            publisher = Publisher(store, Router(config), lambda: None, [events.append])
            src = config.sources[0]
            yield Rig(Watcher(src, TaskAPI(src, session), publisher), up, events)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(answer=answers)
async def test_any_answer_is_a_poll_that_ends(rig: Rig, answer: bytes) -> None:
    rig.upstream.raw = answer
    rig.watcher.status.last_error = None
    async with asyncio.timeout(60):  # only a hang gets near this
        await rig.watcher.poll_once()
    # A bad answer is a failed poll with a reason; `internal` would be a bug met on the way.
    assert not (rig.watcher.status.last_error or "").startswith("internal"), (
        rig.watcher.status.last_error
    )
    for event in rig.events:
        if event.task is not None:
            assert unstorable(event.task) is None  # junk never reaches the rules
    rig.events.clear()


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.one_of(rows, json_values), max_size=10))
def test_parsing_any_rows_gives_tasks_or_a_bad_payload(items: list[Any]) -> None:
    try:
        result = parse_tasks(json.dumps(items).encode())
    except SourceError as exc:
        reason = exc.reason
        assert reason == "bad_payload"  # either outcome is fine; no other
        return
    for task in result.tasks:
        assert isinstance(task["id"], str)
        assert 0 < len(task["id"]) <= 256
        assert isinstance(task["status"], str)
    Snapshot(result.tasks)  # the diff's input shape


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(answer=answers)
async def test_any_push_body_is_refused_or_applied(rig: Rig, answer: bytes) -> None:
    """The push path's own parsing, then the same diff, rules and commit as a poll."""
    try:
        tasks = tasks_of(answer)
    except ValueError:
        return  # a 400 with the reason
    async with asyncio.timeout(60):
        await rig.watcher.push(tasks)
    for event in rig.events:
        if event.task is not None:
            assert unstorable(event.task) is None
    rig.events.clear()

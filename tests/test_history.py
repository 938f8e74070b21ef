"""Reading what happened, beside a running bridge, on SQLite and on PostgreSQL: `bridge events
tail [-f]`, `bridge events show`, `bridge explain --event`, `bridge dlq list --json`, and the
store's history queries (filters, cursor pages) under them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config import load_config
from bridge.simulator import Simulator
from bridge.store.history import CursorError, EventQuery, decode_cursor
from tests import pg
from tests.conftest_browser import SIM_KEY, Harness, advance, eventually, running_bridge
from tests.receiver import Receiver, Reply

RULES = """
sources:
  - name: mj
    base_url: {sim}
    api_key: {key}
    auth: mj-api-secret
    poll_interval: 100ms
targets:
  hook:
    webhook: {rx}/hook
  gone:
    webhook: {refusing}/hook
rules:
  - name: all
    on: "task.*"
    to: [hook]
  - name: finished
    on: [task.succeeded]
    to: [gone]
server:
  listen: 127.0.0.1:0
"""


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "b.db")
    else:
        async with pg.database() as url:
            yield url


@pytest.fixture
async def running(
    db: str, rx: Receiver, tmp_path: Path
) -> AsyncIterator[tuple[Harness, Simulator, Path]]:
    """A bridge with two tasks done: hook got every event; gone refused the successes for good."""
    async with (
        Simulator("midjourney-proxy", api_key=SIM_KEY) as sim,
        Receiver(Reply(410, b"gone for good")) as refusing,
    ):
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(sim=sim.url, key=SIM_KEY, rx=rx.url, refusing=refusing.url))
        config = load_config(str(rules))
        async with running_bridge(config, db) as harness:
            for prompt in ("first cat", "second cat"):
                sim.add_task(prompt, steps=1)
            await advance(harness, sim, 4)
            await eventually(lambda: harness.running.deliverer.counts[("gone", "dead")] >= 2, 30)
            yield harness, sim, rules


async def cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


async def test_events_tail_show_and_explain_beside_a_running_bridge(
    running: tuple[Harness, Simulator, Path], db: str
) -> None:
    _, _, rules = running
    code, out, err = await cli("events", "tail", "--db", db, "--json", "-n", "100")
    assert code == 0, err
    events = _lines(out)
    types = [e["type"] for e in events]
    assert types.count("task.succeeded") == 2
    assert all(e["specversion"] == "1.0" and e["source"] == "bridge/mj" for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)  # oldest first

    code, out, _ = await cli("events", "tail", "--db", db, "--type", "task.succeeded", "--json")
    succeeded = _lines(out)
    assert code == 0
    assert {e["type"] for e in succeeded} == {"task.succeeded"}
    assert len(succeeded) == 2
    code, out, _ = await cli("events", "tail", "--db", db, "--type", "task.*", "--source", "nope")
    assert (code, out) == (0, "")
    code, out, _ = await cli("events", "tail", "--db", db, "-n", "1")
    assert len(out.splitlines()) == 1
    assert events[-1]["id"] in out

    event = succeeded[0]
    code, out, err = await cli("events", "show", event["id"], "--db", db)
    assert code == 0, err
    assert orjson.loads(out) == event
    assert "-> hook: sent" in err
    assert "-> gone: dead" in err
    code, _, err = await cli("events", "show", "evt_nope", "--db", db)
    assert code == 1
    assert "no event 'evt_nope'" in err

    code, out, err = await cli("explain", "-c", str(rules), "--db", db, "--event", event["id"])
    assert code == 0, err
    assert "rule all: matches" in out
    assert "rule finished: matches" in out
    code, _, err = await cli("explain", "-c", str(rules), "--db", db)
    assert code == 2
    assert "--event ID" in err


async def test_events_tail_follows_new_events(
    running: tuple[Harness, Simulator, Path], db: str
) -> None:
    harness, sim, _ = running
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "events",
        "tail",
        "-f",
        "-n",
        "0",
        "--db",
        db,
        "--type",
        "task.succeeded",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):  # following: what is stored from now on is new
            assert "following new events" in (await proc.stderr.readline()).decode()
        task = sim.add_task("a third cat", steps=1)
        await advance(harness, sim, 4)
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        fields = line.split()
        assert fields[1] == "task.succeeded"
        assert fields[2] == "mj"
        assert fields[3] == task
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err


async def test_dlq_list_has_times_targets_a_filter_and_json(
    running: tuple[Harness, Simulator, Path], db: str
) -> None:
    code, out, err = await cli("dlq", "list", "--db", db, "--json")
    assert code == 0, err
    dead = orjson.loads(out)
    assert len(dead) == 2
    for letter in dead:
        assert letter["target"] == "gone"
        assert letter["event_type"] == "task.succeeded"
        assert letter["died_at"].endswith("Z")
        assert letter["created_at"] <= letter["died_at"]
        assert "HTTP 410: gone for good" in letter["last_error"]
    code, out, _ = await cli("dlq", "list", "--db", db, "--json", "--target", "hook")
    assert (code, orjson.loads(out)) == (0, [])
    code, out, _ = await cli("dlq", "list", "--db", db)
    header, *rows, footer = out.splitlines()
    assert header.split()[:7] == ["ID", "TARGET", "EVENT", "TASK", "CREATED", "DIED", "ATTEMPTS"]
    assert footer == "2 dead letters"
    assert all(" gone " in row for row in rows)


async def test_history_pages_with_a_cursor_and_filters(
    running: tuple[Harness, Simulator, Path],
) -> None:
    harness, _, _ = running
    history = harness.running.store.history
    everything = await history.events(EventQuery(limit=1000))
    assert len(everything) >= 6
    pages, cursor = [], None
    while True:
        page = await history.events(EventQuery(limit=2, before=cursor))
        if not page:
            break
        pages += page
        cursor = page[-1].cursor
    assert [s.event.id for s in pages] == [s.event.id for s in everything]
    newest = everything[0]
    forward = await history.events(EventQuery(after=everything[2].cursor, limit=10))
    assert [s.event.id for s in forward] == [s.event.id for s in reversed(everything[:2])]
    assert newest.event.id == forward[-1].event.id

    task = everything[-1].event.subject
    view = await history.task("mj", task)
    assert view.state is not None
    assert view.state.status == "SUCCESS"
    assert view.events[0].event.type == "task.submitted"
    assert {r.item.target for r in view.deliveries} == {"hook", "gone"}
    assert (await history.task("mj", "nope")).state is None

    assert len(await history.dead("gone")) == 2
    assert await history.dead("hook") == []
    assert await history.event("evt_nope") is None
    with pytest.raises(CursorError):
        decode_cursor("not-a-cursor")

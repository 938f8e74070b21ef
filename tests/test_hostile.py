"""A hostile upstream against a real `bridge run` process: rows the bridge cannot handle are
skipped as junk (logged, counted), never the end of the process; the other source and the
deliveries go on, and SIGTERM still stops it cleanly."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.commands.dlq import list_command, replay_command
from bridge.config import Config
from bridge.errors import SourceError
from bridge.metrics import Metrics
from bridge.models import Delivery, Event
from bridge.publish import Publisher
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.sources.poll import TaskAPI
from bridge.store import Store, open_store
from bridge.watch import Watcher
from tests import pg
from tests.hostile import CHUNK, HostileUpstream, deep
from tests.process import BridgeProcess
from tests.receiver import Receiver, make_event

GOOD = {"id": "good-1", "status": "SUCCESS", "progress": "100%", "prompt": "a calm sea"}
JUNK = [
    {"id": "inf-1", "status": "IN_PROGRESS", "progress": "Infinity%"},
    {"id": "inf-2", "status": "IN_PROGRESS", "progress": "inf"},
    {"id": "inf-3", "status": "IN_PROGRESS", "progress": "1e999"},
    {"id": "nan-1", "status": "IN_PROGRESS", "progress": "nan%"},
    {"id": "deep-1", "status": "SUCCESS", "progress": "100%", "properties": deep(300)},
    {"id": "x" * 300, "status": "SUCCESS", "progress": "100%"},
    {"id": "huge-1", "status": "SUCCESS", "progress": "100%", "prompt": "a" * 2_000_000},
]


def config(up: HostileUpstream, sim: Simulator, rx: Receiver, **bad: str) -> str:
    extra = "".join(f"\n    {k}: {v}" for k, v in bad.items())
    return f"""
sources:
  - name: bad
    base_url: {up.url}
    auth: none
    mode: list
    poll_interval: 100ms
    backfill: true{extra}
  - name: sim
    base_url: {sim.url}
    api_key: k
    auth: mj-api-secret
    poll_interval: 100ms
targets:
  hook:
    webhook: {rx.url}/events
rules:
  - name: all
    on: "task.*"
    to: hook
server:
  listen: 127.0.0.1:0
"""


def delivered(rx: Receiver) -> set[tuple[str, str]]:
    return {(r.json()["subject"], r.json()["type"]) for r in rx.requests}


async def test_rows_the_bridge_cannot_handle_are_junk_not_the_end(tmp_path: Path) -> None:
    async with (
        HostileUpstream() as up,
        Simulator("midjourney-proxy", api_key="k") as sim,
        Receiver() as rx,
        aiohttp.ClientSession() as http,
    ):
        up.rows = [*JUNK, GOOD]
        sim.seed_tasks(1)  # so that the first contact says so in the log
        async with BridgeProcess(tmp_path, config(up, sim, rx)) as bridge:
            url = await bridge.serving()
            await rx.wait_for(1)
            await up.wait_lists(up.lists + 5)  # five more polls of the hostile rows
            await bridge.wait_log(r"sim: first contact")  # recorded without events
            tid = sim.add_task("a lighthouse", outcome="success", steps=1)
            sim.tick(3)
            await rx.wait_for(2)
            line = await bridge.wait_log(r"bad: \d+ unusable task row")
            assert bridge.alive, bridge.log
            async with http.get(url + "/metrics") as resp:
                metrics = await resp.text()
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            assert await bridge.stop() == 0, bridge.log
        assert ("good-1", "task.succeeded") in delivered(rx)
        assert (tid, "task.succeeded") in delivered(rx)
        junk_ids = {str(row["id"]) for row in JUNK}
        assert not {subject for subject, _ in delivered(rx)} & junk_ids
        assert "progress is not a finite number: 4" in line
        assert "Traceback" not in bridge.log
        for reason in (
            "progress is not a finite number",
            "nested deeper than 252 levels",
            "id longer than 256 characters",
            "larger than 1024 KiB as JSON",
        ):
            assert f'reason="{reason}",source="bad"' in metrics, reason


class Exploding(Router):
    """A router with a bug that only one task's events trigger: the unexpected exception."""

    def route(self, events: Sequence[Event], now: float | None = None) -> list[Delivery]:
        if any(e.subject == "boom" for e in events):
            raise RuntimeError("a bug met task boom")
        return super().route(events, now)


async def test_an_unexpected_exception_is_the_sources_failure(
    tmp_path: Path, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "bridge")
    async with HostileUpstream() as up:
        up.rows = [GOOD, {"id": "boom", "status": "SUBMITTED", "progress": ""}]
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "bad",
                        "base_url": up.url,
                        "auth": "none",
                        "mode": "list",
                        "backfill": True,
                    }
                ],
                "targets": {"hook": {"webhook": "http://127.0.0.1:9/unused"}},
                "rules": [{"name": "all", "on": "*", "to": "hook"}],
            }
        )
        async with await Store.open(str(tmp_path / "b.db")) as store:
            events: list[Event] = []
            publisher = Publisher(store, Exploding(config), lambda: None, [events.append])
            src = config.sources[0]
            metrics = Metrics()
            watcher = Watcher(src, TaskAPI(src, session), publisher, metrics=metrics)
            for _ in range(4):
                await watcher.poll_once()
            assert [e.type for e in events] == ["source.down"]
            assert events[0].data["reason"] == "internal"
            assert "RuntimeError: a bug met task boom" in events[0].data["message"]
            # The line that carries the traceback (a redacting handler may fold it into the text).
            traces = [r for r in caplog.records if "the source counts it" in r.getMessage()]
            assert len(traces) == 1
            assert traces[0].exc_info or "Traceback" in traces[0].getMessage()
            up.rows = [GOOD]  # the upstream mends the row: the source is up again
            await watcher.poll_once()
            assert [e.type for e in events] == ["source.down", "source.up", "task.succeeded"]


async def test_an_answer_that_never_ends_is_cut_at_max_response(tmp_path: Path) -> None:
    """The default max_response (256MiB) against an upstream that streams forever: the poll
    fails with too_large, the process stays under 512 MB, the other source goes on."""
    async with (
        HostileUpstream() as up,
        Simulator("midjourney-proxy", api_key="k") as sim,
        Receiver() as rx,
    ):
        up.endless = True
        sim.seed_tasks(1)  # so that the first contact says so in the log
        # A long timeout, so that the cap (not the clock) is what ends the read.
        async with BridgeProcess(tmp_path, config(up, sim, rx, timeout="300s")) as bridge:
            await bridge.serving()
            line = await bridge.wait_log(r"bad: poll failed \(too_large\)", within=300)
            peak = bridge.peak_rss()
            up.endless = False
            up.rows = [GOOD]
            await bridge.wait_log(r"sim: first contact")  # recorded without events
            tid = sim.add_task("a lighthouse", outcome="success", steps=1)
            sim.tick(3)
            await rx.wait_for(2)
            assert await bridge.stop() == 0, bridge.log
        assert up.streamed >= 256 * 1024 * 1024 - len(CHUNK)
        assert "larger than max_response (268,435,456 bytes)" in line
        assert peak <= 512 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB"
        print(f"peak RSS {peak / 2**20:.0f} MiB")  # shown with -s: the number in the docs
        assert {("good-1", "task.succeeded"), (tid, "task.succeeded")} <= delivered(rx)


async def test_a_hostile_template_is_a_dead_letter_not_a_frozen_bridge(tmp_path: Path) -> None:
    """Nested range(100000) loops in one rule's body: that rule's delivery becomes a dead letter
    saying why, the other rule delivers, /healthz answers, SIGTERM stops the process."""
    async with (
        Simulator("midjourney-proxy", api_key="k") as sim,
        Receiver() as rx,
        aiohttp.ClientSession() as http,
    ):
        port = rx.url.rsplit(":", 1)[1]
        sim.seed_tasks(1)  # so that the first contact says so in the log
        text = f"""
sources:
  - name: sim
    base_url: {sim.url}
    api_key: k
    poll_interval: 100ms
targets:
  hostile: json://127.0.0.1:{port}/hostile
  fine: json://127.0.0.1:{port}/fine
rules:
  - name: spin
    on: [task.succeeded]
    to: [hostile]
    body: "{{% for a in range(100000) %}}{{% for b in range(100000) %}}{{% endfor %}}{{% endfor %}}"
  - name: tell
    on: [task.succeeded]
    to: [fine]
server:
  listen: 127.0.0.1:0
"""
        async with BridgeProcess(tmp_path, text) as bridge:
            url = await bridge.serving()
            await bridge.wait_log(r"sim: first contact")  # recorded without events
            tid = sim.add_task("a lighthouse", outcome="success", steps=1)
            sim.tick(3)
            await rx.wait_for(1, path="/fine")
            line = await bridge.wait_log(r"hostile: rule 'spin': template stopped")
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            assert await bridge.stop() == 0, bridge.log
        assert "more than 20,000 steps" in line
        assert [r.path for r in rx.requests] == ["/fine"]
        with sqlite3.connect(bridge.db) as db:
            dead = db.execute(
                "SELECT target, last_error FROM outbox WHERE state = 'dead'"
            ).fetchall()
        assert len(dead) == 1
        assert dead[0][0] == "hostile"
        assert "template stopped: more than 20,000 steps" in dead[0][1]
        assert tid in rx.requests[0].body.decode()


def test_bridge_check_never_builds_a_template_constant(tmp_path: Path) -> None:
    """Jinja folds constant expressions when it compiles; `bridge check` of these once took
    seconds and gigabytes. Measured as the peak memory of the `bridge check` process."""
    bodies = ["{{ 'a' * 10**9 }}", "{{ 'a' | center(1000000000) }}", "{{ 'ab' * 999999999 }}"]
    rules = "\n".join(
        f"  - {{name: r{i}, on: [task.failed], to: [t], body: {body!r}}}"
        for i, body in enumerate(bodies)
    )
    config = tmp_path / "rules.yaml"
    config.write_text(f"targets:\n  t: json://127.0.0.1:9\nrules:\n{rules}\n")
    measure = (
        "import resource, subprocess, sys\n"
        "command = [sys.executable, '-m', 'bridge', 'check', '-c', sys.argv[1]]\n"
        "done = subprocess.run(command, stdout=subprocess.DEVNULL)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(done.returncode, peak)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    code, peak_kib = out.stdout.split()[-2:]
    assert code == "0", out.stderr
    assert int(peak_kib) < 300 * 1024, f"bridge check peaked at {int(peak_kib) // 1024} MiB"


SPIN = Config.model_validate(
    {
        "targets": {"spin": "json://127.0.0.1:9/a", "fine": "json://127.0.0.1:9/b"},
        "rules": [
            {"name": "r", "on": "*", "to": "spin", "body": "{{ 'x' * 10**9 }}"},
            {"name": "ok", "on": "*", "to": "fine"},
        ],
    }
)
SPUN = "rule 'r': template stopped: a repetition of 1,000,000,000 characters"


async def test_a_template_over_a_limit_is_stored_as_a_dead_letter(store: Store) -> None:
    publisher = Publisher(store, Router(SPIN), lambda: None)
    event = make_event(1)
    await publisher.publish("mj", {}, [event], now=time.time())
    await publisher.publish("mj", {}, [event], now=time.time())  # re-detected: nothing new
    dead = await store.dead_letters()
    assert [(d.target, d.last_error) for d in dead] == [("spin", SPUN)]
    assert "Prompt: cat 1" in dead[0].body  # the default text, for a replay once fixed
    assert await store.claim("spin", time.time(), 10) == []
    assert [i.target for i in await store.claim("fine", time.time(), 10)] == ["fine"]


class Crash(Exception):
    """The process died here."""


class DiesAfterCommit:
    """The store as a process sees it that is killed the moment its first commit returns:
    nothing it would send the database after that gets there."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.committed = False

    async def commit(self, *args: Any, **kwargs: Any) -> list[Event]:
        if self.committed:
            raise Crash("commit after the crash")
        new = await self.store.commit(*args, **kwargs)
        self.committed = True
        return new

    def __getattr__(self, name: str) -> Any:
        if self.committed:
            raise Crash(f"{name} after the crash")
        return getattr(self.store, name)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_crash_right_after_the_commit_keeps_the_template_dead_letter(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The delivery of a template over a limit is stored dead, with its reason, by the commit
    that stores its event: killed right after that commit, the bridge has left a dead letter that
    `bridge dlq list` shows and `bridge dlq replay` sends with the default text (it once left a
    pending row that was never due, never sent and never listed)."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite":
            db = str(tmp_path / "bridge.db")
        else:
            db = await stack.enter_async_context(pg.database())
        event = make_event(1)
        async with await open_store(db) as store:
            publisher = Publisher(DiesAfterCommit(store), Router(SPIN), lambda: None)
            await publisher.publish("mj", {}, [event], now=time.time())
        capsys.readouterr()

        assert await list_command(db, None, as_json=False) == 0
        listing = capsys.readouterr().out
        assert "template stopped: a repetition of 1,000,000,000 characters" in listing
        assert "1 dead letter" in listing
        assert await list_command(db, None, as_json=True) == 0
        [row] = orjson.loads(capsys.readouterr().out)
        assert (row["target"], row["rule"], row["last_error"]) == ("spin", "r", SPUN)
        assert row["attempts"] == 0  # nothing was sent

        assert await replay_command(db, [row["id"]], False) == 0
        assert "replayed 1 dead letter" in capsys.readouterr().out
        async with await open_store(db) as store:
            [item] = await store.claim("spin", time.time(), 10)
            assert item.id == row["id"]
            assert "Prompt: cat 1" in item.body  # the default text
            assert await store.dead_letters() == []


@pytest.mark.parametrize("endless", [False, True], ids=["large", "endless"])
async def test_max_response_is_counted_while_the_answer_streams(
    session: aiohttp.ClientSession, endless: bool
) -> None:
    async with HostileUpstream() as up:
        up.rows = [{**GOOD, "id": str(i)} for i in range(100)]  # ~7 KB
        up.endless = endless
        config = Config.model_validate(
            {"sources": [{"name": "s", "base_url": up.url, "max_response": "4KiB"}]}
        )
        source = TaskAPI(config.sources[0], session)
        with pytest.raises(SourceError) as caught:
            await source.list_tasks()
        assert caught.value.reason == "too_large"
        assert "larger than max_response (4,096 bytes)" in str(caught.value)
        up.rows = up.rows[:10]
        up.endless = False
        assert len((await source.list_tasks()).tasks) == 10

"""Reading modes against the simulator in each flavour: what auto picks, list and active on
midjourney-proxy, list with its cap on trueai, ids on new-api, re-probing after an outage, and the
bytes an active poll reads next to a list poll."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.config import Config
from bridge.models import Event
from bridge.publish import Publisher
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.sources.modes import SMALL_LIST, ActiveReader
from bridge.sources.poll import TaskAPI
from bridge.sources.probe import choose_reader
from bridge.store import Store
from bridge.watch import Watcher

AUTH = {"midjourney-proxy": "mj-api-secret", "trueai": "raw", "new-api": "bearer"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    sim: Simulator
    watcher: Watcher
    events: list[Event]
    clock: Clock

    async def poll(self) -> list[tuple[str, str]]:
        """One poll; the (subject, type) of what it emitted."""
        before = len(self.events)
        await self.watcher.poll_once()
        return [(e.subject, e.type) for e in self.events[before:]]

    def types(self, subject: str) -> list[str]:
        return [e.type for e in self.events if e.subject == subject]


def make_config(url: str, flavor: str, **source: Any) -> Config:
    rules = source.pop("rules", [])
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": url,
                    "api_key": "k",
                    "auth": AUTH[flavor],
                    "poll_interval": "50ms",
                    **source,
                }
            ],
            "targets": {"hook": {"webhook": "http://127.0.0.1:9/unused"}},
            "rules": rules,
        }
    )


@asynccontextmanager
async def rig(tmp_path: Path, flavor: str, *, seed: int = 0, **source: Any) -> AsyncIterator[Rig]:
    async with (
        Simulator(flavor, api_key="k") as sim,
        aiohttp.ClientSession() as session,
    ):
        sim.seed_tasks(seed)
        config = make_config(sim.url, flavor, **source)
        store = await Store.open(str(tmp_path / "b.db"))
        try:
            events: list[Event] = []
            publisher = Publisher(store, Router(config), lambda: None, [events.append])
            clock = Clock()
            src = config.sources[0]
            watcher = Watcher(src, TaskAPI(src, session), publisher, clock=clock)
            yield Rig(sim, watcher, events, clock)
        finally:
            await store.close()


def paths(sim: Simulator, since: int = 0) -> list[str]:
    return [path for _, path in sim.requests[since:]]


@pytest.mark.parametrize(
    ("flavor", "mode", "needle"),
    [
        ("midjourney-proxy", "active", "/mj/task/query"),
        ("trueai", "list", "/mj/task/list"),
        ("new-api", "ids", "list-by-condition"),
    ],
    ids=["midjourney-proxy", "trueai", "new-api"],
)
async def test_auto_picks_the_cheapest_mode_each_flavour_serves(
    tmp_path: Path, flavor: str, mode: str, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "bridge.watch")
    async with rig(tmp_path, flavor) as r:
        await r.poll()
        assert r.watcher.status.mode == mode
        assert r.watcher.status.up
        assert r.watcher.reader is not None
        assert needle in r.watcher.reader.how
        assert f"reading in {mode} mode" in caplog.text
        assert "auto:" in r.watcher.status.mode_reason


@pytest.mark.parametrize("mode", ["list", "active"])
async def test_midjourney_proxy_lifecycle_in_list_and_active(tmp_path: Path, mode: str) -> None:
    async with rig(tmp_path, "midjourney-proxy", seed=30, mode=mode) as r:
        assert await r.poll() == []  # first contact: recorded silently
        ok = r.sim.add_task("a fox", outcome="success", steps=2)
        bad = r.sim.add_task("cat --ar 1:1:1", outcome="failure", steps=2)
        for _ in range(8):
            await r.poll()
            r.sim.tick()
        await r.poll()
        assert r.types(ok) == [
            "task.submitted",
            "task.started",
            "task.progress",
            "task.succeeded",
        ]
        assert r.types(bad)[-1] == "task.failed"
        assert r.watcher.status.mode == mode


async def test_active_reads_the_list_only_at_start_and_every_full_every(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy", seed=5, mode="active", full_every="10m") as r:
        await r.poll()
        assert "/mj/task/list" in paths(r.sim)
        start = len(r.sim.requests)
        for _ in range(3):
            r.clock.now += 5
            await r.poll()
        assert "/mj/task/list" not in paths(r.sim, start)
        assert "/mj/task/query" in paths(r.sim, start)
        r.clock.now += 600
        start = len(r.sim.requests)
        await r.poll()
        assert paths(r.sim, start)[0] == "/mj/task/list"


async def test_active_sees_tasks_that_change_entirely_between_two_polls(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy", seed=5, mode="active") as r:
        await r.poll()
        tracked = r.sim.add_task("a tracked fox", outcome="success", steps=2)
        await r.poll()
        assert r.types(tracked) == ["task.submitted"]
        # It finishes between two polls: no longer in the unfinished query, found by its id.
        r.sim.tick(10)
        quick = r.sim.add_task("a quick one", outcome="banned")
        r.sim.tick(10)  # begins and ends before the bridge ever sees it
        emitted = await r.poll()
        assert (tracked, "task.succeeded") in emitted
        assert (quick, "task.failed") in emitted


async def test_active_through_the_queue_and_vanished_by_lookup_misses(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy", seed=5, mode="active") as r:
        await r.poll()
        source = r.watcher.source
        r.watcher.reader = ActiveReader(source, "queue", 600.0, "queue", last_full=r.clock.now)
        start = len(r.sim.requests)
        gone = r.sim.add_task("soon forgotten", outcome="timeout", steps=50)
        await r.poll()
        assert r.types(gone) == ["task.submitted"]
        assert paths(r.sim, start) == ["/mj/task/queue"]
        r.sim.remove_task(gone)
        await r.poll()
        await r.poll()
        assert r.types(gone)[-1] == "task.vanished"
        assert "/mj/task/list-by-condition" in paths(r.sim, start)
        assert "/mj/task/list" not in paths(r.sim, start)


async def test_trueai_list_with_its_cap_looks_up_older_unfinished(tmp_path: Path) -> None:
    async with rig(tmp_path, "trueai", mode="auto") as r:
        old = r.sim.add_task("an old slow one", outcome="success", steps=8)
        await r.poll()  # first contact: recorded
        for i in range(120):  # pushes `old` out of the newest 100
            r.sim.add_task(f"filler {i}", outcome="success", steps=1)
        r.sim.tick(30)
        start = len(r.sim.requests)
        await r.poll()
        assert r.watcher.status.mode == "list"
        assert "/mj/task/list-by-condition" in paths(r.sim, start)
        assert r.types(old)[-1] == "task.succeeded"


async def test_active_on_trueai_falls_back_to_its_capped_list(tmp_path: Path) -> None:
    async with rig(tmp_path, "trueai", mode="active") as r:
        await r.poll()
        assert r.watcher.status.mode == "active"
        assert "neither /mj/task/query nor /mj/task/queue" in r.watcher.status.mode_reason
        tid = r.sim.add_task("a heron", outcome="success", steps=1)
        for _ in range(4):
            await r.poll()
            r.sim.tick()
        assert r.types(tid)[-1] == "task.succeeded"


async def test_new_api_ids_mode_follows_tracked_ids_only(tmp_path: Path) -> None:
    async with rig(tmp_path, "new-api", seed=10) as r:
        await r.poll()
        assert r.watcher.status.mode == "ids"
        assert paths(r.sim)[-1] == "/mj/task/list-by-condition"  # health check, nothing tracked
        probed = len(r.sim.requests)
        tid = r.sim.add_task("a relay task", outcome="success", steps=2)
        assert await r.watcher.track([tid, tid]) == [tid]
        assert await r.watcher.track([tid]) == []
        for _ in range(6):
            await r.poll()
            r.sim.tick()
        assert r.types(tid)[0] == "task.submitted"
        assert r.types(tid)[-1] == "task.succeeded"
        assert all(e.subject == tid for e in r.events)
        assert set(paths(r.sim, probed)) == {"/mj/task/list-by-condition"}


async def test_list_mode_on_new_api_is_not_a_task_api(tmp_path: Path) -> None:
    async with rig(tmp_path, "new-api", mode="list") as r:
        await r.poll()
        assert r.watcher.health.reason == "not_a_task_api"


async def test_auto_probes_again_after_the_source_comes_back(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy", mode="auto") as r:
        await r.poll()
        assert r.watcher.status.mode == "active"
        r.sim.fault = "502"
        for _ in range(5):
            await r.poll()
        assert any(e.type == "source.down" for e in r.events)
        assert r.watcher.reader is None
        r.sim.fault = None
        start = len(r.sim.requests)
        emitted = await r.poll()
        assert ("mj", "source.up") in emitted
        assert paths(r.sim, start)[0] == "/mj/task/query"  # probed again
        assert r.watcher.status.mode == "active"


async def test_a_probe_that_cannot_authenticate_fails_the_poll(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy", api_key="wrong") as r:
        await r.poll()
        assert r.watcher.reader is None
        assert r.watcher.health.reason == "auth_failed"


async def test_explicit_modes_report_missing_endpoints(tmp_path: Path) -> None:
    async with Simulator("new-api", api_key="k") as sim, aiohttp.ClientSession() as session:
        config = make_config(sim.url, "new-api", mode="active").sources[0]
        reader, why = await choose_reader(config, TaskAPI(config, session))
        assert "/mj/task/list" in reader.how  # falls back; the list then fails as not a task API
        assert "neither" in why


async def test_active_reads_over_100x_fewer_bytes_per_poll_than_list(tmp_path: Path) -> None:
    """20,000 stored tasks, 50 unfinished (bench/upstream.py measures 100,000)."""
    per_poll: dict[str, float] = {}
    for mode in ("list", "active"):
        (tmp_path / mode).mkdir()
        async with rig(tmp_path / mode, "midjourney-proxy", mode=mode) as r:
            r.sim.seed_tasks(20_000)
            r.sim.seed_tasks(50, finished=False)
            await r.poll()  # start: both read the whole list once
            start = r.sim.bytes_sent
            polls = 3
            for _ in range(polls):
                r.sim.tick()
                r.clock.now += 5
                await r.poll()
            per_poll[mode] = (r.sim.bytes_sent - start) / polls
            assert r.watcher.status.unfinished <= 50
            changes = sum(1 for e in r.events if e.type != "task.progress")
            assert changes > 0, "active mode still reports the changes"
    assert per_poll["list"] >= 100 * per_poll["active"], per_poll


# nz: the open-source midjourney-proxy 2.x (no /mj/task/query), with the same header as plus.
AUTH.setdefault("nz", "mj-api-secret")


async def test_auto_on_nz_reads_the_queue_and_reports_every_change(tmp_path: Path) -> None:
    async with rig(tmp_path, "nz", seed=20) as r:
        await r.poll()
        assert r.watcher.status.mode == "active"
        assert r.watcher.reader is not None
        assert r.watcher.reader.how.startswith("GET /mj/task/queue")
        assert "/mj/task/queue" in r.watcher.status.mode_reason
        probe = paths(r.sim)
        assert probe.index("/mj/task/query") < probe.index("/mj/task/queue")  # query: a 404
        start = len(r.sim.requests)
        tid = r.sim.add_task("a fox on nz", outcome="success", steps=3)
        served = []
        for _ in range(6):
            await r.poll()
            served.append(((r.sim.task(tid) or {})["status"], (r.sim.task(tid) or {})["progress"]))
            r.sim.tick()
        await r.poll()
        served.append(((r.sim.task(tid) or {})["status"], (r.sim.task(tid) or {})["progress"]))
        assert [s for s, _ in served] == [
            "NOT_START",
            "SUBMITTED",
            *["IN_PROGRESS"] * 3,
            "SUCCESS",
            "SUCCESS",
        ]
        mine = [e for e in r.events if e.subject == tid]
        assert [e.type for e in mine] == [
            "task.submitted",
            "task.started",
            "task.progress",
            "task.progress",
            "task.succeeded",
        ]
        # Every state the upstream served shows up in an event, except SUBMITTED ("0%"), which
        # shares task.submitted with NOT_START.
        reported = [(e.task or {}).get("progress") for e in mine]
        assert reported == [p for s, p in served[:6] if s != "SUBMITTED"]
        # 20 tasks is a small list: read whole each poll, so nothing waits for a full read.
        assert paths(r.sim, start).count("/mj/task/list") == 7
        assert r.watcher.status.note == ""


@pytest.mark.parametrize("flavor", ["midjourney-proxy", "nz", "trueai"])
async def test_by_default_a_task_begun_and_ended_between_polls_is_reported_at_the_next(
    tmp_path: Path, flavor: str
) -> None:
    async with rig(tmp_path, flavor, seed=30) as r:
        await r.poll()
        await r.poll()
        quick = r.sim.add_task("cat --ar 1:1:1", outcome="banned")
        r.sim.tick(10)  # it fails before the bridge ever sees it
        assert (r.sim.task(quick) or {})["status"] == "FAILURE"
        r.clock.now += 5
        assert (quick, "task.failed") in await r.poll()


async def test_auto_on_nz_with_a_large_list_bounds_the_delay_and_says_how_push_removes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "bridge.watch")
    async with rig(tmp_path, "nz", seed=SMALL_LIST + 1) as r:
        await r.poll()
        note = r.watcher.status.note
        assert "501 tasks" in note
        assert "up to 60s (full_every) late" in note
        assert "push_token: ${MJ_PUSH_TOKEN}" in note
        assert "mj.notify-hook: http://<bridge>:8787/hooks/mj?token=<push_token>" in note
        assert [rec.levelname for rec in caplog.records if note in rec.getMessage()] == ["WARNING"]
        quick = r.sim.add_task("cat --ar 1:1:1", outcome="banned")
        r.sim.tick(10)
        start = len(r.sim.requests)
        r.clock.now += 5
        assert (quick, "task.failed") not in await r.poll()
        assert "/mj/task/list" not in paths(r.sim, start)  # the queue, not the large list
        r.clock.now += 60  # full_every, by default
        assert (quick, "task.failed") in await r.poll()

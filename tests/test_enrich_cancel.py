"""`enrich: [seed]` and `cancel: true` against the simulator: the seed rides on task.succeeded
(and its absence, or a seed API that hangs, never holds the event back); a stalled task is
cancelled once and the next event says what happened."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge import actions
from tests import test_junk
from tests.test_modes import Rig, rig

STALL_RULES = [
    {"name": "kill-stalled", "on": "task.stalled", "to": "hook", "cancel": True},
    {"name": "all", "on": "*", "to": "hook"},
]


def last(r: Rig, tid: str, type_: str) -> Any:
    return next(e for e in reversed(r.events) if e.subject == tid and e.type == type_)


async def run_to_end(r: Rig, polls: int = 8) -> None:
    for _ in range(polls):
        await r.poll()
        r.sim.tick()
        r.clock.now += 1


@pytest.mark.parametrize("flavor", ["midjourney-proxy", "new-api"])
async def test_seed_is_added_to_succeeded_events(tmp_path: Path, flavor: str) -> None:
    async with rig(tmp_path, flavor, enrich=["seed"]) as r:
        await r.poll()
        tid = r.sim.add_task("a seeded fox", outcome="success", steps=1)
        if flavor == "new-api":
            await r.watcher.track([tid])
        await run_to_end(r)
        done = last(r, tid, "task.succeeded")
        assert done.task["seed"] == r.sim._tasks[tid].seed
        seeds = [p for _, p in r.sim.requests if p.endswith("/image-seed")]
        assert seeds == [f"/mj/task/{tid}/image-seed"]  # asked once
        started = last(r, tid, "task.started")
        assert "seed" not in started.task or not started.task["seed"]


async def test_a_failed_seed_lookup_never_holds_the_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(tmp_path, "midjourney-proxy", enrich=["seed"]) as r:
        await r.poll()
        tid = r.sim.add_task("no seed today", outcome="success", steps=1)
        r.sim.tick(5)
        task = r.sim.task(tid)
        assert task is not None
        r.sim.fault = "500"  # the seed endpoint fails; the pushed change still goes out
        new = await r.watcher.push([task])
        assert [e.type for e in new] == ["task.succeeded"]
        assert "seed" not in (new[0].task or {})
        assert "no seed for task" in caplog.text


async def test_a_hanging_seed_api_holds_the_event_only_briefly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "SEED_TIMEOUT", 0.2)
    release = asyncio.Event()
    async with test_junk.rig(tmp_path, "midjourney-proxy", enrich=["seed"], timeout="30s") as r:
        await r.poll()
        slow = r.sim.add_task("a seed that never comes", outcome="success", steps=1)
        quick = r.sim.add_task("a seed that comes", outcome="success", steps=1)
        r.sim.tick(5)

        async def hang(request: web.Request) -> web.StreamResponse | None:
            if request.path == f"/mj/task/{slow}/image-seed":
                await release.wait()  # no answer while the test runs
                return web.Response(status=504)
            return None

        r.proxy.rewrite = hang
        tasks = [r.sim.task(slow), r.sim.task(quick)]
        try:
            # A guard, not a speed check: unbounded, the seed would wait out the 30s timeout.
            async with asyncio.timeout(10):
                new = await r.watcher.push([t for t in tasks if t is not None])
        finally:
            release.set()
        assert {(e.subject, e.type) for e in new} == {
            (slow, "task.succeeded"),
            (quick, "task.succeeded"),
        }
        seeds = {e.subject: (e.task or {}).get("seed") for e in new}
        assert seeds == {slow: None, quick: r.sim._tasks[quick].seed}  # asked at the same time
        assert f"no seed for task {slow}: no answer within 0.2s" in caplog.text
        # The source goes on: the next poll reads as usual.
        assert r.watcher.status.up
        await r.poll()
        assert r.watcher.status.last_error is None


async def test_without_enrich_no_seed_is_asked(tmp_path: Path) -> None:
    async with rig(tmp_path, "midjourney-proxy") as r:
        await r.poll()
        tid = r.sim.add_task("plain", outcome="success", steps=1)
        await run_to_end(r)
        assert (tid, "task.succeeded") in [(e.subject, e.type) for e in r.events]
        assert not [p for _, p in r.sim.requests if p.endswith("/image-seed")]


@pytest.mark.parametrize(
    ("flavor", "ending"),
    [("midjourney-proxy", "task.cancelled"), ("trueai", "task.failed")],
)
async def test_a_stalled_task_is_cancelled_once(tmp_path: Path, flavor: str, ending: str) -> None:
    async with rig(tmp_path, flavor, stall_after="1m", rules=STALL_RULES) as r:
        await r.poll()
        tid = r.sim.add_task("stuck", outcome="timeout", steps=1000)
        r.sim.tick(3)
        await r.poll()
        r.clock.now += 61
        emitted = await r.poll()
        assert (tid, "task.stalled") in emitted
        cancels = [p for _, p in r.sim.requests if p.endswith("/cancel")]
        assert cancels == [f"/mj/task/{tid}/cancel"]
        emitted = await r.poll()
        assert (tid, ending) in emitted
        end = last(r, tid, ending)
        assert end.data["cancel"]["ok"] is True
        assert end.data["cancel"]["rule"] == "kill-stalled"
        assert end.data["cancel"]["requested_at"].endswith("Z")
        r.clock.now += 600
        await r.poll()
        assert len([p for _, p in r.sim.requests if p.endswith("/cancel")]) == 1


async def test_a_refused_cancel_is_reported_on_the_next_event(tmp_path: Path) -> None:
    async with rig(tmp_path, "new-api", stall_after="1m", rules=STALL_RULES) as r:
        await r.poll()
        tid = r.sim.add_task("slow relay task", outcome="success", steps=3)
        await r.watcher.track([tid])
        r.sim.tick(2)
        await r.poll()
        r.clock.now += 61
        assert (tid, "task.stalled") in await r.poll()
        r.sim.tick(10)
        emitted = await r.poll()
        assert (tid, "task.succeeded") in emitted
        cancel = last(r, tid, "task.succeeded").data["cancel"]
        assert cancel["ok"] is False
        assert "no cancel endpoint" in cancel["answer"]


async def test_stalled_without_a_cancel_rule_cancels_nothing(tmp_path: Path) -> None:
    rules = [{"name": "all", "on": "*", "to": "hook"}]
    async with rig(tmp_path, "midjourney-proxy", stall_after="1m", rules=rules) as r:
        await r.poll()
        tid = r.sim.add_task("stuck", outcome="timeout", steps=1000)
        r.sim.tick(3)
        await r.poll()
        r.clock.now += 61
        assert (tid, "task.stalled") in await r.poll()
        assert not [p for _, p in r.sim.requests if p.endswith("/cancel")]

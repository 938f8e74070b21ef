"""The whole pipeline as a user runs it: the simulator over real HTTP in each flavour, the real
Bridge (SQLite file, rules, outbox, signed webhooks) and a local receiver."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from bridge.app import Bridge
from bridge.config import Config
from bridge.demo import demo
from bridge.simulator import Simulator
from tests.receiver import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
AUTH = {"midjourney-proxy": "mj-api-secret", "trueai": "raw", "new-api": "bearer"}


def make_config(sim: Simulator, receiver: Receiver, flavor: str, **source: Any) -> Config:
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": sim.url,
                    "api_key": "k",
                    "auth": AUTH[flavor],
                    "poll_interval": "50ms",
                    **source,
                }
            ],
            "targets": {"hook": {"webhook": receiver.url + "/events", "secret": SECRET}},
            "rules": [{"name": "all", "on": "*", "to": "hook"}],
        }
    )


@asynccontextmanager
async def running(config: Config, db: Path) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, str(db))
    task = asyncio.create_task(bridge.run())
    await bridge.wait_started()
    try:
        yield bridge
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15)


def events(receiver: Receiver) -> list[dict[str, Any]]:
    """Every delivered event, its signature verified by the standardwebhooks package."""
    verifier = Webhook(SECRET)
    out = []
    for r in receiver.requests:
        out.append(verifier.verify(r.body, r.headers))
    return out


async def until(predicate: Any, sim: Simulator | None = None, within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            if sim is not None:
                sim.tick()
            await asyncio.sleep(0.1)


async def settle(bridge: Bridge, polls: int = 3) -> None:
    """`polls` more polls of every source (good or failed), then until the outbox is empty:
    whatever those polls found has been delivered, so what has not arrived never will."""
    running = bridge.running
    assert running is not None
    watchers = list(running.watchers.values())
    wanted = [w.status.polls + w.health.failures + polls for w in watchers]
    await until(
        lambda: all(
            w.status.polls + w.health.failures >= n for w, n in zip(watchers, wanted, strict=True)
        )
    )
    async with asyncio.timeout(15):
        while True:
            depth = await running.store.outbox_depth()
            if not any(depth.values()):
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("flavor", ["midjourney-proxy", "trueai"])
async def test_every_change_is_delivered_once_signed(tmp_path: Path, flavor: str) -> None:
    async with Simulator(flavor, api_key="k") as sim, Receiver() as receiver:
        sim.seed_tasks(3)
        config = make_config(sim, receiver, flavor)
        async with running(config, tmp_path / "b.db") as bridge:
            assert bridge.running is not None
            watcher = bridge.running.watchers["mj"]
            await until(lambda: watcher.status.polls >= 2)
            ok = sim.add_task("a lighthouse", outcome="success", steps=3)
            bad = sim.add_task("cat --ar 1:1:1", outcome="failure", steps=1)

            def done() -> bool:
                ends = {(e["subject"], e["type"]) for e in events(receiver)}
                return {(ok, "task.succeeded"), (bad, "task.failed")} <= ends

            await until(done, sim)
            await settle(bridge)  # a few more polls: nothing more may arrive

        got = events(receiver)
        ids = [e["id"] for e in got]
        assert len(ids) == len(set(ids)), "an event was delivered twice"
        assert {e["subject"] for e in got} == {ok, bad}, "seeded tasks emitted (backfill: false)"
        ok_types = [e["type"] for e in got if e["subject"] == ok]
        assert ok_types[0] == "task.submitted"
        assert "task.started" in ok_types
        assert ok_types[-1] == "task.succeeded"
        assert ok_types.count("task.succeeded") == 1
        failed = next(e for e in got if e["subject"] == bad and e["type"] == "task.failed")
        assert failed["data"]["task"]["failReason"]
        assert failed["source"] == "bridge/mj"


async def test_changes_while_down_are_emitted_once_after_restart(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim, Receiver() as receiver:
        config = make_config(sim, receiver, "midjourney-proxy")
        async with running(config, tmp_path / "b.db") as bridge:
            assert bridge.running is not None
            watcher = bridge.running.watchers["mj"]
            await until(lambda: watcher.status.polls >= 1)
            tid = sim.add_task("a fox", outcome="success", steps=3)
            await until(lambda: any(e["subject"] == tid for e in events(receiver)))
        before = len(receiver.requests)
        sim.tick(10)  # the task finishes while the bridge is stopped
        async with running(config, tmp_path / "b.db") as again:
            await until(lambda: any(e["type"] == "task.succeeded" for e in events(receiver)))
            await settle(again)
        async with running(config, tmp_path / "b.db") as third:
            await settle(third)  # a third start re-emits nothing
        got = events(receiver)
        after = [e["type"] for e in got[before:]]
        assert after == ["task.succeeded"]
        assert len({e["id"] for e in got}) == len(got)


async def test_new_api_list_is_reported_as_not_a_task_api(tmp_path: Path) -> None:
    async with Simulator("new-api", api_key="k") as sim, Receiver() as receiver:
        config = make_config(sim, receiver, "new-api", mode="list")
        async with running(config, tmp_path / "b.db") as bridge:
            await until(lambda: bool(receiver.requests))
            await settle(bridge, polls=2)
        got = events(receiver)
        assert Counter(e["type"] for e in got) == {"source.down": 1}
        assert got[0]["data"]["reason"] == "not_a_task_api"


async def test_demo_shows_every_kind_of_delivery() -> None:
    lines: list[str] = []
    assert await demo(seconds=60, show=lines.append) == 0
    text = "\n".join(lines)
    for kind in ("submitted", "started", "progress", "succeeded", "failed"):
        assert re.search(rf"pipeline: task\.{kind} .*\(signature verified\)", text), kind
    assert "does not verify" not in text
    assert "✉ chat:" in text


@pytest.mark.parametrize(
    "command",
    [[], ["run"], ["check"], ["demo"], ["simulate"], ["explain"], ["send-test"], ["dlq"]],
    ids=lambda c: " ".join(c) or "bridge",
)
def test_every_command_says_what_it_does(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bridge", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: bridge" in out
    assert len(out.splitlines()) > 3

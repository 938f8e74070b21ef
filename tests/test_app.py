"""The running service as a whole: reloads that keep what they should (throttles, the old config
when the new one cannot start), a clear error for a port that is taken, and replicas that share
what they learn through the store."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bridge.app import Bridge
from bridge.commands.track import track_command
from bridge.config import Config, ServerConfig, WebhookTargetConfig
from bridge.simulator import Simulator
from tests import pg
from tests.receiver import Receiver


def config(sim: Simulator, receiver: Receiver, **extra: Any) -> Config:
    rule = {"name": "all", "on": "*", "to": "hook", **extra.pop("rule", {})}
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": sim.url,
                    "api_key": "k",
                    "auth": "mj-api-secret",
                    "poll_interval": "50ms",
                    **extra.pop("source", {}),
                }
            ],
            "targets": {"hook": {"webhook": receiver.url + "/events"}},
            "rules": [rule],
            **extra,
        }
    )


@asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[Bridge]:
    task = asyncio.create_task(bridge.run())
    await bridge.wait_started()
    try:
        yield bridge
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15)


async def until(check: Callable[[], object], sim: Simulator | None = None) -> None:
    async with asyncio.timeout(15):
        while not check():
            if sim is not None:
                sim.tick()
            await asyncio.sleep(0.1)


def events(receiver: Receiver) -> list[dict[str, Any]]:
    return [r.json() for r in receiver.requests]


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_a_reload_keeps_throttled_tasks_throttled(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim, Receiver() as receiver:
        throttled = config(sim, receiver, rule={"on": "task.progress", "throttle": "1h"})
        bridge = Bridge(throttled, str(tmp_path / "b.db"))
        async with running(bridge):
            await until(lambda: bridge.running and bridge.running.watchers["mj"].status.polls)
            tid = sim.add_task("slow", steps=8)
            await until(lambda: events(receiver), sim)
            # The same rules, reloaded (an edit elsewhere in the file): the hour is not over.
            bridge.swap(throttled.model_copy())
            await until(lambda: bridge.running and bridge.running.config is not throttled)
            await until(lambda: (sim.task(tid) or {}).get("status") == "SUCCESS", sim)
            await asyncio.sleep(0.5)
        assert [e["type"] for e in events(receiver)] == ["task.progress"]


async def test_a_reload_that_cannot_listen_keeps_the_old_config(tmp_path: Path) -> None:
    with busy_port() as taken:
        await _reload_to(taken, tmp_path)


async def _reload_to(taken: socket.socket, tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim, Receiver() as receiver:
        good = config(sim, receiver, server={"listen": "127.0.0.1:0"})
        bridge = Bridge(good, str(tmp_path / "b.db"))
        async with running(bridge):
            port = taken.getsockname()[1]
            bridge.swap(
                good.model_copy(update={"server": ServerConfig(listen=f"127.0.0.1:{port}")})
            )
            await until(lambda: bridge.config is good and bridge.running is not None)
            await until(lambda: bridge.url is not None)
            tid = sim.add_task("still watched")
            await until(lambda: any(e["subject"] == tid for e in events(receiver)), sim)


def test_a_port_that_is_taken_is_one_clear_line(tmp_path: Path) -> None:
    with busy_port() as taken:
        port = taken.getsockname()[1]
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"server:\n  listen: 127.0.0.1:{port}\n")
        command = ["run", "-c", str(rules), "--db", str(tmp_path / "b.db")]
        done = subprocess.run(
            [sys.executable, "-m", "bridge", *command],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_ids_stored_while_the_bridge_runs_are_followed(tmp_path: Path) -> None:
    """`bridge track` with no server to hand them to writes the ids to the database; the bridge
    that polls the source picks them up at its next poll."""
    async with Simulator("new-api", api_key="k") as sim, Receiver() as receiver:
        cfg = config(sim, receiver, source={"auth": "bearer", "mode": "ids"})
        bridge = Bridge(cfg, str(tmp_path / "b.db"))
        async with running(bridge):
            await until(lambda: bridge.running and bridge.running.watchers["mj"].status.polls)
            tid = sim.add_task("tracked from a shell", steps=2)
            assert await track_command(cfg, str(tmp_path / "b.db"), "mj", [tid]) == 0
            await until(lambda: any(e["type"] == "task.succeeded" for e in events(receiver)), sim)
        assert {e["subject"] for e in events(receiver)} == {tid}


async def test_a_follower_that_takes_over_resumes_from_the_shared_state() -> None:
    """Two replicas on PostgreSQL: the follower takes a /track (so it holds states of its own),
    the leader reports the task's changes, then the leader stops and the follower takes over.
    Nothing it reports repeats a change the leader already reported."""
    async with (
        pg.database() as url,
        Simulator("midjourney-proxy", api_key="k") as sim,
        Receiver() as receiver,
    ):
        cfg = config(sim, receiver, source={"mode": "list"})
        leader, follower = Bridge(cfg, url), Bridge(cfg, url)
        async with running(leader):
            await until(lambda: leader.running and leader.running.watchers["mj"].leading)
            async with running(follower):
                assert follower.running is not None
                watcher = follower.running.watchers["mj"]
                assert not watcher.leading
                tid = sim.add_task("handed over", steps=6)
                await watcher.track([tid])
                await until(lambda: len(events(receiver)) >= 3, sim)
                leader.stop()  # a clean stop releases the lease: the follower takes over
                await until(lambda: watcher.leading)
                await until(
                    lambda: any(e["type"] == "task.succeeded" for e in events(receiver)), sim
                )
                await asyncio.sleep(0.3)
    got = events(receiver)
    changes = Counter((e["type"], e["data"]["task"]["progress"]) for e in got)
    assert max(changes.values()) == 1, changes
    assert [e["type"] for e in got].count("task.started") == 1


async def test_an_outage_before_first_contact_keeps_backfill_off(tmp_path: Path) -> None:
    """The upstream is down when the bridge starts (source.down), then answers: its existing
    tasks are recorded silently, as on any first contact with `backfill: false`."""
    async with Simulator("midjourney-proxy", api_key="k") as sim, Receiver() as receiver:
        sim.seed_tasks(3, finished=False)
        sim.fault = "500"
        bridge = Bridge(config(sim, receiver, source={"mode": "list"}), str(tmp_path / "b.db"))
        async with running(bridge):
            await until(lambda: any(e["type"] == "source.down" for e in events(receiver)))
            sim.fault = None
            await until(lambda: any(e["type"] == "source.up" for e in events(receiver)))
            await asyncio.sleep(0.3)
        assert [e["type"] for e in events(receiver)] == ["source.down", "source.up"]


async def test_a_target_removed_from_the_config_leaves_dead_letters(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim, Receiver() as receiver:
        both = config(sim, receiver, source={"mode": "list"})
        both = both.model_copy(
            update={
                "targets": {
                    **both.targets,
                    "gone": WebhookTargetConfig(webhook="http://127.0.0.1:9/nobody"),
                },
                "rules": [both.rules[0].model_copy(update={"to": ["hook", "gone"]})],
            }
        )
        bridge = Bridge(both, str(tmp_path / "b.db"))
        async with running(bridge):
            await until(lambda: bridge.running and bridge.running.watchers["mj"].status.polls)
            sim.add_task("for both")
            await until(lambda: events(receiver), sim)
            assert bridge.running is not None
            depth = await bridge.running.store.outbox_depth()
            assert depth.get("gone", 0) >= 1
        only_hook = config(sim, receiver, source={"mode": "list"})
        bridge = Bridge(only_hook, str(tmp_path / "b.db"))
        async with running(bridge) as again:
            assert again.running is not None
            assert "gone" not in await again.running.store.outbox_depth()
            dead = await again.running.store.dead_letters()
        assert dead
        assert {d.target for d in dead} == {"gone"}

"""SIGKILL `bridge run` at random moments while tasks move upstream: after the last restart every
task's ending has arrived, every event the bridge ever recorded was delivered, and no change was
delivered under two different ids."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from bridge.simulator import Simulator
from tests.conftest import bridge
from tests.receiver import Receiver

ENDINGS = {"task.succeeded", "task.failed", "task.cancelled"}


def write_config(path: Path, sim: Simulator, receiver: Receiver, mode: str) -> None:
    path.write_text(
        f"""
sources:
  - name: mj
    base_url: {sim.url}
    api_key: k
    auth: mj-api-secret
    poll_interval: 100ms
    backfill: true
    mode: {mode}
targets:
  hook:
    webhook: {receiver.url}/events
rules:
  - name: all
    on: "*"
    to: hook
"""
    )


async def start(config: Path, db: Path) -> asyncio.subprocess.Process:
    return await bridge("run", "-c", str(config), "--db", str(db), log=Path(os.devnull))


def _ended(receiver: Receiver) -> set[str]:
    return {r.json()["subject"] for r in receiver.requests if r.json()["type"] in ENDINGS}


async def _next_request(receiver: Receiver, sim: Simulator) -> None:
    """Wait for the next delivery, moving the simulator along so there is something to tell."""
    seen = len(receiver.requests)
    async with asyncio.timeout(20):
        while True:
            try:
                await receiver.wait_for(seen + 1, within=0.5)
                return
            except TimeoutError:
                sim.tick()


@pytest.mark.parametrize("mode", ["list", "auto"])
async def test_sigkill_at_any_moment_loses_nothing(tmp_path: Path, mode: str) -> None:
    rng = random.Random(1)
    config, db = tmp_path / "rules.yaml", tmp_path / "bridge.db"
    async with Simulator("midjourney-proxy", api_key="k", seed=3) as sim, Receiver() as receiver:
        write_config(config, sim, receiver, mode)
        outcomes = ["success", "failure", "success", "cancel", "banned"]
        ids: list[str] = []
        for round_ in range(5):
            # New work every round, so the bridge always has something to tell when it is killed.
            for i in range(8):
                ids.append(sim.add_task(f"task {round_}.{i}", outcome=outcomes[i % 5], steps=4))
            proc = await start(config, db)
            # Kill only once the bridge is live: polling, committing and delivering (the new
            # tasks wait at NOT_START, so a live bridge has their task.submitted to deliver).
            await receiver.wait_for(len(receiver.requests) + 1, within=60)
            for _ in range(rng.randint(1, 4)):
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                sim.tick()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        sim.tick(20)  # everything finishes while the bridge is down
        proc = await start(config, db)
        try:
            async with asyncio.timeout(30):
                while not _ended(receiver) >= set(ids):
                    await _next_request(receiver, sim)
            await asyncio.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0

    delivered: dict[str, dict[str, object]] = {}
    for r in receiver.requests:
        body = r.json()
        assert r.headers["webhook-id"] == body["id"]
        assert delivered.setdefault(body["id"], body) == body, "one id, two different events"

    ids_per_change: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    endings: dict[str, set[str]] = defaultdict(set)
    for body in delivered.values():
        task = body["data"]["task"]  # type: ignore[index]
        key = (body["subject"], body["type"], task.get("status"), task.get("progress"))  # type: ignore[union-attr]
        ids_per_change[key].add(str(body["id"]))  # type: ignore[arg-type]
        if body["type"] in ENDINGS:
            endings[str(body["subject"])].add(str(body["id"]))
    assert all(len(v) == 1 for v in ids_per_change.values()), "a change under two ids"
    assert {k: len(v) for k, v in endings.items()} == dict.fromkeys(ids, 1)

    with sqlite3.connect(db) as conn:
        recorded = {row[0] for row in conn.execute("SELECT id FROM events")}
    assert recorded <= set(delivered), "an event was recorded but never delivered"

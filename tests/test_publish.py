"""Publishing a large change (a first contact with `backfill: true`): routed slice by slice, with
the event loop let go in between, and still the same deliveries in the same order, the same
throttle and digest memory, and every event delivered once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge import publish
from bridge.config import Config
from bridge.models import Event
from bridge.publish import SLICE, Publisher
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.store import Store
from tests.conftest_browser import SIM_KEY, running_bridge
from tests.receiver import Receiver

T0 = 1_800_000_000.0
TYPES = ("task.submitted", "task.progress", "task.failed", "task.succeeded", "task.stalled")


def config() -> Config:
    return Config.model_validate(
        {
            "targets": {
                "chat": "json://127.0.0.1:9/chat",
                "ops": "json://127.0.0.1:9/ops",
                "hook": {"webhook": "http://127.0.0.1:9/hook"},
            },
            "rules": [
                {"name": "quiet", "on": ["task.progress"], "when": {"prompt": "*quiet*"},
                 "to": [], "stop": True},
                {"name": "failures", "on": ["task.failed"], "to": ["ops"], "throttle": "10m",
                 "title": "{{ task.prompt }} failed", "body": "{{ task.failReason }}"},
                {"name": "stalls", "on": ["task.stalled"], "to": ["ops"], "cancel": True,
                 "throttle": "1h"},
                {"name": "digest", "on": ["task.*"], "to": ["chat", "ops"],
                 "group": {"by": ["task.action"], "wait": "30s", "interval": "1m"}},
                {"name": "all", "on": ["*"], "to": ["hook"]},
            ],
        }
    )  # fmt: skip


def events(n: int, start: int = 0) -> list[Event]:
    """n events over 150 tasks, a second apart: throttles and digest windows both bite."""
    made = []
    for i in range(start, start + n):
        tid = str(1000 + i % 150)
        task: dict[str, Any] = {
            "id": tid,
            "action": ("IMAGINE", "UPSCALE", "VARIATION")[i % 3],
            "status": "FAILURE",
            "prompt": f"task {tid}" + (" quiet" if i % 7 == 0 else ""),
            "failReason": f"reason {i % 5}",
        }
        type_ = TYPES[i % len(TYPES)]
        made.append(
            Event(
                id=f"evt_{i}",
                type=type_,
                source="mj",
                subject=tid,
                time=datetime.fromtimestamp(T0 + i, UTC),
                task=task,
                data={},
            )
        )
    return made


async def test_a_large_change_is_routed_as_in_one_piece_while_the_loop_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "STRETCH", 0.0)  # let go of the loop after every slice
    whole, sliced = Router(config()), Router(config())
    store = await Store.open(str(tmp_path / "b.db"))
    try:
        publisher = Publisher(store, sliced, lambda: None)
        batch = events(SLICE * 40 + 7)

        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        got = await publisher.route(batch, T0 + 5)
        during = ticks - before
        ticker.cancel()
        expected = whole.route(batch, T0 + 5)

        assert during >= 40  # other work ran between the slices
        assert got == expected  # the same deliveries (ids, targets, texts, groups) in order
        assert len({d.id for d in got}) == len(got)
        assert Counter(d.rule for d in got).keys() >= {"failures", "digest", "stalls", "all"}
        # ... and the same memory: what both routers make of what comes next, and the cancels
        # they decided.
        for stall in (e for e in batch if e.type == "task.stalled"):
            assert sliced.cancels(stall) == whole.cancels(stall)
        later = events(SLICE * 3, start=len(batch))
        assert await publisher.route(later, T0 + 6) == whole.route(later, T0 + 6)
    finally:
        await store.close()


async def test_a_large_change_from_two_sources_is_routed_one_change_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two changes published at once: each is routed whole before the other starts, as when
    routing never let go of the loop (throttles and digest windows see each change whole)."""
    monkeypatch.setattr(publish, "STRETCH", 0.0)
    whole, sliced = Router(config()), Router(config())
    store = await Store.open(str(tmp_path / "b.db"))
    try:
        publisher = Publisher(store, sliced, lambda: None)
        first, second = events(SLICE * 10), events(SLICE * 10, start=SLICE * 10)
        got = await asyncio.gather(publisher.route(first, T0), publisher.route(second, T0))
        assert got == [whole.route(first, T0), whole.route(second, T0)]
    finally:
        await store.close()


async def test_a_backfill_of_thousands_is_delivered_once_each(
    rx: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first contact with backfill: true over 3,000 tasks, routed slice by slice with the loop
    let go after each: every task's event reaches the webhook exactly once, under the id the
    store holds."""
    monkeypatch.setattr(publish, "STRETCH", 0.0)
    tasks = 3000
    async with Simulator(api_key=SIM_KEY) as sim:
        sim.seed_tasks(tasks)
        cfg = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": sim.url,
                        "api_key": SIM_KEY,
                        "auth": "mj-api-secret",
                        "mode": "list",
                        "poll_interval": "30s",
                        "backfill": True,
                    }
                ],
                "targets": {"hook": {"webhook": f"{rx.url}/hook"}},
                "rules": [{"name": "all", "on": ["task.*"], "to": ["hook"]}],
                "server": {"listen": "127.0.0.1:0"},
            }
        )
        async with running_bridge(cfg, tmp_path / "b.db"):
            await rx.wait_for(tasks, within=60)
    # The bridge has stopped (deliveries drained): nothing more can arrive.
    received = [r.json() for r in rx.requests]
    subjects = Counter(body["subject"] for body in received)
    assert len(subjects) == tasks
    assert set(subjects.values()) == {1}
    with contextlib.closing(sqlite3.connect(tmp_path / "b.db")) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM events")}
    assert {body["id"] for body in received} == stored

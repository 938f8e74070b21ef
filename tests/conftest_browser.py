"""Harness for the server and status-page tests: a real Bridge (store, watchers, deliverer, HTTP
server) against the simulator and the receiver, started and stopped the way `bridge run` does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.app import Bridge, Running
from bridge.config import Config

PUSH_TOKEN = "push-token-123"
SIM_KEY = "sim-key-456"


def make_config(
    sim_url: str,
    rx_url: str,
    *,
    poll: str = "30s",
    extra_sources: list[dict[str, Any]] | None = None,
    target: dict[str, Any] | None = None,
) -> Config:
    """One source `mj` on the simulator (push enabled), one webhook target `hook` on the
    receiver, one rule sending every task event there, the server on a free port."""
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": sim_url,
                    "api_key": SIM_KEY,
                    "auth": "mj-api-secret",
                    "poll_interval": poll,
                    "push_token": PUSH_TOKEN,
                },
                *(extra_sources or []),
            ],
            "targets": {"hook": target or {"webhook": f"{rx_url}/hook"}},
            "rules": [{"name": "all", "on": ["task.*"], "to": ["hook"]}],
            "server": {"listen": "127.0.0.1:0"},
        }
    )


@dataclass
class Harness:
    bridge: Bridge
    running: Running
    url: str


@asynccontextmanager
async def running_bridge(
    config: Config, db: Path | str, *, polled: Collection[str] | None = None
) -> AsyncIterator[Harness]:
    """Run `Bridge.run()` as a task until the block exits; waits for the first poll of every
    source (or of those named in `polled`) so tests start from a known state."""
    bridge = Bridge(config, str(db))
    task = asyncio.create_task(bridge.run())
    try:
        started = asyncio.ensure_future(bridge.wait_started())
        async with asyncio.timeout(10):
            await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await task  # run() ended first: raise what it raised
            raise AssertionError("bridge.run() returned before starting")
        running = started.result()
        url = bridge.url
        assert url is not None, "the server is not bound"
        await eventually(
            lambda: all(
                w.status.polls
                for name, w in running.watchers.items()
                if polled is None or name in polled
            )
        )
        yield Harness(bridge, running, url)
    finally:
        bridge.stop()
        async with asyncio.timeout(15):
            await task


async def eventually(check: Callable[[], object], within: float = 10.0) -> None:
    """Wait until `check()` is truthy, looking every 10 ms, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


async def advance(harness: Harness, sim: Any, ticks: int) -> None:
    """Move the simulator's tasks `ticks` steps, letting the bridge see each step."""
    watcher = harness.running.watchers["mj"]
    for _ in range(ticks):
        sim.tick()
        polls = watcher.status.polls
        await eventually(lambda polls=polls: watcher.status.polls >= polls + 2, 30)  # type: ignore[misc]

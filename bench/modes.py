"""Bytes per poll, `active` against `list` mode: 100,000 stored tasks of which 50 are unfinished,
read from the simulator (midjourney-proxy) through the real Watcher. `python -m bench.modes`.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import aiohttp

from bridge.config import Config
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.sources.poll import PollingSource
from bridge.store import Store
from bridge.watch import Pipeline, Watcher

__all__ = ["bytes_per_poll", "main"]


async def bytes_per_poll(mode: str, tasks: int, unfinished: int, polls: int = 3) -> float:
    """The mean bytes the upstream sent per poll after the first (which reads the whole list in
    both modes), with every unfinished task advancing one step between polls."""
    async with Simulator("midjourney-proxy", api_key="k") as sim, aiohttp.ClientSession() as s:
        sim.seed_tasks(tasks - unfinished)
        sim.seed_tasks(unfinished, finished=False)
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": sim.url,
                        "api_key": "k",
                        "auth": "mj-api-secret",
                        "mode": mode,
                    }
                ]
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            store = await Store.open(str(Path(tmp) / "b.db"))
            try:
                events: list[object] = []
                pipeline = Pipeline(store, Router(config), lambda: None, [events.append])
                src = config.sources[0]
                watcher = Watcher(src, PollingSource(src, s), pipeline)
                await watcher.poll_once()
                start = sim.bytes_sent
                for _ in range(polls):
                    sim.tick()
                    await watcher.poll_once()
                if not events:
                    raise RuntimeError(f"{mode}: no change was reported")
                return (sim.bytes_sent - start) / polls
            finally:
                await store.close()


async def main(tasks: int = 100_000, unfinished: int = 50) -> tuple[float, float]:
    listed = await bytes_per_poll("list", tasks, unfinished)
    active = await bytes_per_poll("active", tasks, unfinished)
    print(
        f"{tasks:,} tasks, {unfinished} unfinished: list {listed / 1e6:.1f} MB/poll, "
        f"active {active / 1e3:.1f} KB/poll, {listed / active:.0f}x fewer bytes (target >= 100x)"
    )
    return listed, active


if __name__ == "__main__":
    asyncio.run(main())

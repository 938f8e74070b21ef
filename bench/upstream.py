"""Figure: what the bridge costs the upstream in steady state: requests and bytes per poll cycle,
counted by the simulator, for `mode: list` (next to the naive poller a user would write instead)
and `mode: active`, through the real `Bridge` wiring.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import Row, fmt_bytes, ratio
from bench.latency import API_KEY, running
from bench.naive import NaivePoller
from bench.receiver import ReceiverProcess
from bridge.app import Bridge
from bridge.config import Config
from bridge.models import Event
from bridge.simulator import Simulator

RUNNING = 50  # unfinished tasks, each changing every cycle
CYCLES = 5
LIST = "/mj/task/list"


@dataclass(frozen=True, slots=True)
class Cost:
    requests: float  # per poll cycle, median
    bytes: float
    events: int  # task events the bridge committed over the measured cycles
    paths: Counter[str]  # every request of the measured cycles, by "METHOD path"


def upstream(tasks: int, cycles: int) -> tuple[Simulator, list[str]]:
    """`tasks` stored tasks, RUNNING of them unfinished (their ids returned), not started yet."""
    sim = Simulator("midjourney-proxy", api_key=API_KEY)
    sim.seed_tasks(tasks - RUNNING)
    ids = [sim.add_task(f"running {i}", steps=4 * cycles) for i in range(RUNNING)]
    sim.tick(2)
    return sim, ids


async def measure(tasks: int, mode: str, cycles: int) -> Cost:
    """After the bridge's first contact, each cycle advances every running task one step, then
    polls once."""
    sim, ids = upstream(tasks, cycles)
    events: list[Event] = []
    await sim.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
            config = Config.model_validate(
                {
                    "sources": [
                        {
                            "name": "mj",
                            "base_url": sim.url,
                            "api_key": API_KEY,
                            "auth": "mj-api-secret",
                            "poll_interval": "1h",  # polls once at start; the cycles poll by hand
                            "mode": mode,
                        }
                    ]
                }
            )
            bridge = Bridge(config, str(Path(tmp) / "bridge.db"))
            bridge.on_event.append(events.append)
            async with running(bridge):
                watcher = (await bridge.wait_started()).watchers["mj"]
                async with asyncio.timeout(60):
                    while watcher.status.polls < 1:  # noqa: ASYNC110 (no event for it)
                        await asyncio.sleep(0.01)
                events.clear()
                requests, sizes, paths = await _cycles(sim, cycles, watcher.poll_once)
    finally:
        await sim.stop()
    changed = sum(1 for e in events if e.subject in set(ids))
    return Cost(statistics.median(requests), statistics.median(sizes), changed, paths)


async def _cycles(
    sim: Simulator, cycles: int, poll: Callable[[], Awaitable[object]]
) -> tuple[list[int], list[int], Counter[str]]:
    """Tick the upstream and poll it `cycles` times: requests and bytes per cycle, and which
    endpoints were asked."""
    requests, sizes = [], []
    first = len(sim.requests)
    for _ in range(cycles):
        count, sent = len(sim.requests), sim.bytes_sent
        sim.tick()
        await poll()
        requests.append(len(sim.requests) - count)
        sizes.append(sim.bytes_sent - sent)
    return requests, sizes, Counter(f"{m} {p}" for m, p in sim.requests[first:])


async def measure_naive(tasks: int, cycles: int) -> Cost:
    """The same upstream and cycles, read by the naive poller (bench/naive.py) instead, posting
    its changes to a receiver in another process. `events` counts its POSTs."""
    sim, _ = upstream(tasks, cycles)  # every running task changes each cycle: all POSTs are theirs
    await sim.start()
    try:
        async with ReceiverProcess() as rx, aiohttp.ClientSession() as session:
            headers = {"mj-api-secret": API_KEY}
            poller = NaivePoller(session, sim.url, headers, rx.url + "/naive")
            await poller.cycle()  # first contact: records, posts nothing
            requests, sizes, paths = await _cycles(sim, cycles, poller.cycle)
    finally:
        await sim.stop()
    return Cost(statistics.median(requests), statistics.median(sizes), poller.posted, paths)


def _describe(cost: Cost) -> str:
    """e.g. "2 requests (GET /mj/task/queue, POST /mj/task/list-by-condition), 49.2 KB"."""
    plural = "" if cost.requests == 1 else "s"
    kinds = ", ".join(sorted(cost.paths))
    return f"{cost.requests:g} request{plural} ({kinds}), {fmt_bytes(cost.bytes)}"


def _implemented(active: Cost) -> bool:
    """Steady-state polls in active mode read no full list (it is read at start and every
    full_every); a source that ignores the mode reads it every time."""
    return not any(path.endswith(LIST) for path in active.paths)


def _active_row(tasks: int, listed: Cost, active: Cost | None) -> Row:
    figure = f"Upstream cost per poll, {tasks:,} tasks ({RUNNING} running), mode: active vs list"
    goal = ">= 100x fewer bytes" if tasks >= 100_000 else ""
    if active is None or not _implemented(active):
        why = "n/a (mode: active is not implemented yet: every poll still reads /mj/task/list)"
        peer = _describe(listed) if active is not None else "—"
        short = f"Upstream per poll, {tasks:,} tasks, active vs list"
        return Row(figure, why, peer, target=goal, short=short)
    fewer = listed.bytes / active.bytes if active.bytes else float("inf")
    same = "same events" if active.events == listed.events else "EVENTS DIFFER"
    return Row(
        f"{figure} ({active.events} vs {listed.events} task events: {same})",
        _describe(active),
        _describe(listed),
        f"{ratio(listed.bytes, active.bytes)} fewer bytes",
        f"{goal}: " + ("met" if fewer >= 100 else "NOT met") if goal else "",
        short=f"Upstream per poll, {tasks:,} tasks, active vs list ({same})",
    )


def run(quick: bool = False) -> list[Row]:
    sizes = (1_000,) if quick else (10_000, 100_000)
    cycles = 2 if quick else CYCLES
    listed = asyncio.run(measure(sizes[0], "list", cycles))
    naive = asyncio.run(measure_naive(sizes[0], cycles))
    same = "same changes" if naive.events == listed.events else "CHANGES DIFFER"
    rows = [
        Row(
            f"Upstream cost per poll, {sizes[0]:,} tasks ({RUNNING} running), mode: list vs the "
            f"naive poller ({listed.events} task events vs {naive.events} POSTs: {same}); "
            "both read the whole list, so the bytes match by design",
            _describe(listed),
            _describe(naive),
            ratio(listed.bytes, naive.bytes),
            "1 request per poll: " + ("met" if listed.requests == 1 else "NOT met"),
            short=f"Upstream per poll, {sizes[0]:,} tasks, list mode, vs a naive poller",
        )
    ]
    active = asyncio.run(measure(sizes[0], "active", cycles))
    rows.append(_active_row(sizes[0], listed, active))
    for tasks in sizes[1:]:
        if not _implemented(active):
            rows.append(_active_row(tasks, listed, None))  # the bigger size would say the same
            continue
        # Three cycles at this size: each list read is a few hundred MB.
        listed = asyncio.run(measure(tasks, "list", min(cycles, 3)))
        active = asyncio.run(measure(tasks, "active", min(cycles, 3)))
        rows.append(_active_row(tasks, listed, active))
    return rows

"""Figure: end-to-end latency through the whole bridge (`Bridge`, as `bridge run` wires it), from
the moment the simulator changes a task (a tick) to the receipt of the webhook at a receiver in
another process. Polling (poll_interval 1s) runs beside a naive 1s poller watching the same
changes; push callbacks (notifyHook -> /hooks) are set against notifyHook straight to the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import Row, fmt_time, percentile, ratio
from bench.naive import NaivePoller
from bench.receiver import ReceiverProcess
from bridge.app import Bridge
from bridge.config import Config
from bridge.models import Event
from bridge.simulator import Simulator

API_KEY = "bench-key"
PUSH_TOKEN = "bench-push-token"
STEPS = 99  # progress updates per probe task: one sample each


@dataclass(slots=True)
class Seen:
    """Which (task id, progress) changes a poller has handled: the bridge's `on_event` hook (set
    on commit) or the naive poller's `on_post` (set once the POST was answered)."""

    waiting: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def _flag(self, key: tuple[str, str]) -> asyncio.Event:
        return self.waiting.setdefault(key, asyncio.Event())

    def __call__(self, event: Event) -> None:
        if event.task is not None:
            self.task(event.task)

    def task(self, task: dict[str, Any]) -> None:
        self._flag((str(task.get("id")), str(task.get("progress")))).set()

    async def wait(self, task_id: str, progress: str, within: float) -> None:
        async with asyncio.timeout(within):
            await self._flag((task_id, progress)).wait()


@dataclass(frozen=True, slots=True)
class Tick:
    task_id: str
    progress: str
    at: float  # unix time of the change


def config(sims: list[Simulator], rx_url: str, poll_interval: float, push: bool) -> Config:
    sources = [
        {
            "name": f"lane{i}",
            "base_url": sim.url,
            "api_key": API_KEY,
            "auth": "mj-api-secret",
            "poll_interval": poll_interval,
            "backfill": True,
            "mode": "list",
            **({"push_token": PUSH_TOKEN} if push else {}),
        }
        for i, sim in enumerate(sims)
    ]
    raw: dict[str, Any] = {
        "sources": sources,
        "targets": {"rx": {"webhook": rx_url + "/bridge", "concurrency": 8}},
        "rules": [{"name": "all", "on": ["task.*"], "to": ["rx"]}],
    }
    if push:
        raw["server"] = {"listen": "127.0.0.1:0"}
    return Config.model_validate(raw)


@contextlib.asynccontextmanager
async def simulators(count: int) -> AsyncIterator[list[Simulator]]:
    sims = [Simulator("midjourney-proxy", api_key=API_KEY, seed=i) for i in range(count)]
    try:
        for sim in sims:
            await sim.start()
        yield sims
    finally:
        for sim in sims:
            await sim.stop()


@contextlib.asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[None]:
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(30):
            started = asyncio.ensure_future(bridge.wait_started())
            await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                started.cancel()
                task.result()  # raises why the bridge stopped
        yield
    finally:
        bridge.stop()
        async with asyncio.timeout(30):
            await task


async def lane(
    sim: Simulator, seen: list[Seen], gap: float, samples: int, rng: random.Random
) -> list[Tick]:
    """One probe task: after each change has been seen by every poller watching (or posted by the
    simulator itself when there is none), wait a random time in [0, gap) so changes fall at
    every phase of the poll cycle, then change it again."""
    task_id = sim.add_task("latency probe --ar 3:2", steps=STEPS)
    sim.tick(2)  # SUBMITTED, then IN_PROGRESS: the samples are the progress updates after it
    ticks: list[Tick] = []
    for _ in range(samples + 1):
        progress = str((sim.task(task_id) or {}).get("progress"))
        if seen:
            for watcher in seen:
                await watcher.wait(task_id, progress, within=30)
        else:
            async with asyncio.timeout(30):
                await sim.flush()
        if len(ticks) == samples:
            break
        await asyncio.sleep(rng.uniform(0, gap))
        at = time.time()
        sim.tick()
        ticks.append(Tick(task_id, str((sim.task(task_id) or {}).get("progress")), at))
    return ticks


async def _latencies(rx: ReceiverProcess, path: str, ticks: list[Tick]) -> list[float]:
    """Arrival minus change time per tick, once every tick's webhook has arrived."""
    wanted = {(t.task_id, t.progress) for t in ticks}
    async with asyncio.timeout(30):
        while True:
            arrivals = {(r[2], r[4]): r[0] for r in await rx.log() if r[1] == path}
            if wanted <= arrivals.keys():
                return [arrivals[(t.task_id, t.progress)] - t.at for t in ticks]
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def naive_pollers(
    sims: list[Simulator], rx_url: str, poll: float, seen: Seen
) -> AsyncIterator[None]:
    """One naive poller per simulator (as a user would run one script per upstream), polling
    every `poll` seconds and posting to the receiver's /naive. Primed before the lanes start."""
    headers = {"mj-api-secret": API_KEY}
    async with aiohttp.ClientSession() as session:
        pollers = [NaivePoller(session, s.url, headers, rx_url + "/naive", seen.task) for s in sims]
        for poller in pollers:
            await poller.cycle()
        loops = [asyncio.create_task(poller.run(poll)) for poller in pollers]
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
            for loop in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await loop


async def through_bridge(
    lanes: int, samples: int, poll: float, gap: float, push: bool
) -> dict[str, list[float]]:
    """Latencies by receiver path: "/bridge", and with polling "/naive" (the naive pollers watch
    the same simulators, so both see the very same changes at the same moments)."""
    rng = random.Random(1)
    async with ReceiverProcess(record=True) as rx, simulators(lanes) as sims:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            seen, naive_seen = Seen(), Seen()
            bridge = Bridge(config(sims, rx.url, poll, push), str(Path(tmp) / "bridge.db"))
            bridge.on_event.append(seen)
            async with running(bridge), contextlib.AsyncExitStack() as stack:
                watchers = [seen]
                if push:
                    url = bridge.url
                    if url is None:
                        raise RuntimeError("the bridge's server is not listening")
                    for i, sim in enumerate(sims):
                        sim.notify_hook = f"{url}/hooks/lane{i}?token={PUSH_TOKEN}"
                else:
                    await stack.enter_async_context(naive_pollers(sims, rx.url, poll, naive_seen))
                    watchers.append(naive_seen)
                runs = [lane(sim, watchers, gap, samples, rng) for sim in sims]
                ticks = [t for lane_ticks in await asyncio.gather(*runs) for t in lane_ticks]
                paths = ["/bridge"] if push else ["/bridge", "/naive"]
                return {path: await _latencies(rx, path, ticks) for path in paths}


async def direct(lanes: int, samples: int, gap: float) -> list[float]:
    """The peer of push: midjourney-proxy's own notifyHook posting straight to the receiver."""
    rng = random.Random(2)
    async with ReceiverProcess(record=True) as rx, simulators(lanes) as sims:
        for sim in sims:
            sim.notify_hook = rx.url + "/direct"
        runs = [lane(sim, [], gap, samples, rng) for sim in sims]
        ticks = [t for lane_ticks in await asyncio.gather(*runs) for t in lane_ticks]
        return await _latencies(rx, "/direct", ticks)


FLAVOURS = ("midjourney-proxy", "nz", "trueai", "new-api")
DEFAULT_POLL = 5.0  # poll_interval's default: the rows below run with every default


async def between_polls(flavor: str, samples: int, gap: float) -> dict[str, Any]:
    """Tasks that start and end between two polls (submitted, then refused at once), each at a
    random phase of the poll cycle, against a bridge with the default source settings (mode auto,
    auth detected, poll_interval 5s) and, on the same changes, the naive poller every 5 s.
    Latency: the task's final change -> its webhook received. On new-api (mode ids) a task is
    followed once its id is known, as a pass-through submit teaches the bridge (it is tracked when
    submitted) and as a script knows the ids it submitted (the naive poller asks for those).
    Returns {"bridge": latencies, "naive": latencies, "mode": the mode auto chose}."""
    rng = random.Random(f"between-{flavor}")
    sim = Simulator(flavor, api_key=API_KEY, seed=5)
    sim.seed_tasks(30)
    await sim.start()
    finished: dict[str, float] = {}
    try:
        async with ReceiverProcess(record=True) as rx, aiohttp.ClientSession() as session:
            with tempfile.TemporaryDirectory(prefix="bench-between-") as tmp:
                raw: dict[str, Any] = {
                    "sources": [{"name": "mj", "base_url": sim.url, "api_key": API_KEY}],
                    "targets": {"rx": {"webhook": rx.url + "/between", "concurrency": 8}},
                    "rules": [{"name": "failures", "on": ["task.failed"], "to": ["rx"]}],
                }
                bridge = Bridge(Config.model_validate(raw), str(Path(tmp) / "bridge.db"))
                task = asyncio.create_task(bridge.run())
                naive: asyncio.Task[None] | None = None
                try:
                    live = await asyncio.wait_for(bridge.wait_started(), 30)
                    watcher = live.watchers["mj"]
                    async with asyncio.timeout(30):
                        while not watcher.status.polls:  # noqa: ASYNC110 (a counter, no event)
                            await asyncio.sleep(0.05)
                    mode = watcher.status.mode
                    ids = (lambda: list(finished)) if mode == "ids" else None
                    poller = NaivePoller(
                        session, sim.url, {"mj-api-secret": API_KEY}, rx.url + "/naive", ids=ids
                    )
                    await poller.cycle()
                    naive = asyncio.create_task(poller.run(DEFAULT_POLL))
                    for _ in range(samples):
                        await asyncio.sleep(rng.uniform(0, gap))
                        task_id = sim.add_task("cat --ar 1:1:1", outcome="banned")
                        if mode == "ids":
                            await watcher.track([task_id])
                        sim.tick(2)  # SUBMITTED, FAILURE: over before any poll sees it
                        finished[task_id] = time.time()
                    out: dict[str, Any] = {"mode": mode}
                    for path in ("/between", "/naive"):
                        async with asyncio.timeout(DEFAULT_POLL * 4 + 30):
                            while True:
                                rows = await rx.log()
                                arrivals = {
                                    r[2]: r[0] for r in rows if r[1] == path and r[3] == "FAILURE"
                                }
                                if finished.keys() <= arrivals.keys():
                                    break
                                await asyncio.sleep(0.1)
                        out[path] = [arrivals[t] - at for t, at in finished.items()]
                finally:
                    if naive is not None:
                        naive.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await naive
                    bridge.stop()
                    async with asyncio.timeout(30):
                        await task
    finally:
        await sim.stop()
    return {"bridge": out["/between"], "naive": out["/naive"], "mode": out["mode"]}


def between_rows(quick: bool) -> list[Row]:
    samples, gap = (4, 0.5) if quick else (30, 0.6)
    rows = []
    for flavor in FLAVOURS:
        found = asyncio.run(between_polls(flavor, samples, gap))
        ours, theirs = percentile(found["bridge"], 99), percentile(found["naive"], 99)
        bound = DEFAULT_POLL + 1.0  # one poll interval plus one read (and the send)
        rows.append(
            Row(
                f"Latency p99, default settings, {flavor} (auto: {found['mode']} mode), a task "
                f"that starts and ends between two polls -> webhook received "
                f"({len(found['bridge'])} tasks) vs a naive {DEFAULT_POLL:g}s poller of the "
                + ("submitted ids" if found["mode"] == "ids" else "task list"),
                fmt_time(ours),
                fmt_time(theirs),
                ratio(ours, theirs),
                target=f"within poll_interval + one read ({bound:g} s): "
                + ("met" if ours <= bound else "NOT met"),
                short=f"Latency p99, defaults, {flavor}, task begun and ended between polls",
            )
        )
    return rows


def run(quick: bool = False) -> list[Row]:
    lanes, poll_samples, push_samples, poll = (2, 3, 5, 0.2) if quick else (4, 25, 90, 1.0)
    measured = asyncio.run(through_bridge(lanes, poll_samples, poll, gap=poll, push=False))
    polled, naive = measured["/bridge"], measured["/naive"]
    # For scale only: an ideal poller sees a change after a uniform share of the interval.
    rows = [
        Row(
            f"Latency p{q}, poll_interval {poll:g}s, change -> webhook received "
            f"({len(polled)} changes) vs a naive {poll:g}s poller on the same changes "
            f"(computed ideal poller: {fmt_time(poll * q / 100)})",
            fmt_time(percentile(polled, q)),
            fmt_time(percentile(naive, q)),
            ratio(percentile(polled, q), percentile(naive, q)),
            short=f"Latency p{q}, polling every {poll:g}s, vs a naive poller",
        )
        for q in (50, 99)
    ]
    rows += between_rows(quick)
    # A slow poll (30s) so every sample is a push; changes 0-50ms apart.
    try:
        pushed = asyncio.run(through_bridge(lanes, push_samples, 30.0, gap=0.05, push=True))[
            "/bridge"
        ]
    except (TimeoutError, RuntimeError, ImportError) as exc:
        why = f"n/a (push hooks did not deliver: {type(exc).__name__} {exc})"
        return [*rows, *(Row(f"Latency p{q}, push callbacks", why) for q in (50, 99))]
    peer = asyncio.run(direct(lanes, push_samples, gap=0.05))
    for q in (50, 99):
        ours, theirs = percentile(pushed, q), percentile(peer, q)
        rows.append(
            Row(
                f"Latency p{q}, push (notifyHook -> /hooks -> diff -> outbox -> webhook, "
                f"{len(pushed)} changes) vs notifyHook straight to the receiver",
                fmt_time(ours),
                fmt_time(theirs),
                ratio(ours, theirs),
                short=f"Latency p{q}, push, vs notifyHook straight to the receiver",
            )
        )
    return rows

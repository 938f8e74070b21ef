"""Figure: the deliver stage. Events through the durable outbox (Store + Deliverer + signed webhook
target, a temp SQLite file) to a receiver in another process, against a bare pooled aiohttp client,
the webhook target's own connections posting bare (no outbox, no signature), and apprise's json://
(sync `notify` and async `async_notify`) posting the same bodies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import apprise
import orjson
from yarl import URL

from bench import Row, fmt_rate, ratio
from bench.diff import get_bytes
from bench.receiver import ReceiverProcess
from bridge.config import Config
from bridge.deliver import Deliverer
from bridge.diff import Snapshot, diff
from bridge.models import Delivery, Event
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.sources.normalize import parse_tasks
from bridge.store import Store
from bridge.targets import build_target, close_targets
from bridge.targets.http1 import Origin, request_head
from bridge.targets.notify import load_plugins

CONCURRENCY = 16  # sends in flight, the same for every contender
FILLED = 40_000  # events already stored (and delivered) for the "filled" figure
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a Standard Webhooks test secret


async def make_events(n: int) -> list[Event]:
    """n events as the bridge makes them: the diff of a simulator's task list seen for the first
    time (mostly task.succeeded, a realistic CloudEvent of about 2 KB each)."""
    sim = Simulator("midjourney-proxy", api_key=None)
    sim.seed_tasks(n)
    await sim.start()
    try:
        async with aiohttp.ClientSession() as session:
            body = await get_bytes(session, sim.url + "/mj/task/list")
    finally:
        await sim.stop()
    return diff("mj", {}, Snapshot(parse_tasks(body).tasks), now=time.time()).events


def config(url: str) -> Config:
    return Config.model_validate(
        {
            "targets": {
                "rx": {"webhook": url + "/bridge", "secret": SECRET, "concurrency": CONCURRENCY}
            },
            "rules": [{"name": "all", "on": ["*"], "to": ["rx"]}],
        }
    )


def renamed(events: list[Event], tag: str) -> list[Event]:
    """The same events under new ids: new to a store that holds the originals."""
    return [dataclasses.replace(e, id=f"{e.id}-{tag}") for e in events]


async def fresh(events: list[Event], url: str, workdir: Path, round_: int) -> float:
    """`ours` into a new, empty database file."""
    store = await Store.open(str(workdir / f"outbox-{round_}.db"))
    try:
        return await ours(events, url, store)
    finally:
        await store.close()


async def prefill(store: Store, events: list[Event], count: int) -> None:
    """Store `count` events (renamed copies of `events`) and deliver them, on paper: claimed and
    marked sent through the store, as a bridge that has been running leaves its database."""
    cfg = config("http://127.0.0.1:9")  # never sent to
    for n in range(count // len(events)):
        batch = renamed(events, f"old{n}")
        await store.commit("mj", {}, batch, Router(cfg).route(batch, time.time()))
        while items := await store.claim("rx", time.time() + 1, len(batch)):
            await store.mark_sent([i.id for i in items])


async def ours(events: list[Event], url: str, store: Store) -> float:
    """Seconds from committing the events (as the bridge stores one snapshot's changes) until every
    delivery is marked sent in the database."""
    cfg = config(url)
    deliveries: list[Delivery] = Router(cfg).route(events, time.time())
    async with aiohttp.ClientSession() as session:
        targets = {"rx": build_target("rx", cfg.targets["rx"], session)}
        deliverer = Deliverer(store, targets, cfg.targets)
        running = asyncio.create_task(deliverer.run())
        try:
            start = time.perf_counter()
            # As the bridge's pipeline does: sending starts with the first stored part.
            await store.commit("mj", {}, events, deliveries, progress=deliverer.wake)
            deliverer.wake()
            while deliverer.counts[("rx", "sent")] < len(deliveries):
                await asyncio.sleep(0.002)
                if running.done():
                    running.result()  # raises what stopped it
            await deliverer.drain(10.0)  # flushes the last acks
            elapsed = time.perf_counter() - start
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await close_targets(targets.values())
    depth = await store.outbox_depth()
    if depth:
        raise RuntimeError(f"outbox not drained: {depth}")
    return elapsed


async def bare(bodies: list[bytes], url: str) -> float:
    """A pooled aiohttp client posting the same bodies, CONCURRENCY at a time, no persistence."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(bodies)

        async def worker() -> None:
            for body in queue:
                async with session.post(url + "/bare", data=body, headers=headers) as response:
                    await response.read()
                    response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - start


async def connections(bodies: list[bytes], url: str) -> float:
    """The webhook target's own keep-alive connections (http1.Origin) posting the same bodies,
    CONCURRENCY at a time: what the bridge's sends cost without the outbox and the signature."""
    async with Origin(URL(url)) as origin:
        queue = iter(bodies)
        fixed = [("Content-Type", "application/json")]

        async def worker() -> None:
            for body in queue:
                head = request_head("POST", "/lean", origin.authority, fixed, len(body))
                answer = await origin.request(head, body, 30.0)
                if answer.status != 200:
                    raise RuntimeError(f"the receiver answered {answer.status}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - start


def _apprise(url: str) -> Any:
    load_plugins()  # loads apprise's plugins once, its import warnings quiet
    notifier = apprise.Apprise()
    if not notifier.add(url.replace("http://", "json://") + "/apprise"):
        raise RuntimeError("apprise refused the json:// URL")
    return notifier


def apprise_sync(bodies: list[str], url: str) -> float:
    """apprise's `notify`, one call per message, as a script would use it."""
    notifier = _apprise(url)
    start = time.perf_counter()
    for body in bodies:
        if not notifier.notify(body=body, title="task.succeeded"):
            raise RuntimeError("apprise json:// failed")
    return time.perf_counter() - start


async def apprise_async(bodies: list[str], url: str) -> float:
    """apprise's `async_notify`, CONCURRENCY calls in flight."""
    notifier = _apprise(url)
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            if not await notifier.async_notify(body=body, title="task.succeeded"):
                raise RuntimeError("apprise json:// failed")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start


async def _measure(
    events: int, apprise_events: int, rounds: int, filled: int
) -> dict[str, list[float]]:
    """Rates (messages per second) of each contender in each of `rounds` rounds; a round runs
    them back to back, so a slow moment of a shared machine weighs on all of them alike."""
    made = await make_events(events)
    bodies = [orjson.dumps(e.cloudevent()) for e in made]
    texts = [b.decode() for b in bodies[:apprise_events]]
    rates: dict[str, list[float]] = {
        "ours": [],
        "filled": [],
        "bare": [],
        "lean": [],
        "sync": [],
        "async": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        async with ReceiverProcess() as rx, await Store.open(f"{tmp}/filled.db") as grown:
            await prefill(grown, made, filled)
            expected = 0
            contenders: list[tuple[str, int, Callable[[int], Awaitable[float]]]] = [
                ("ours", len(made), lambda r: fresh(made, rx.url, Path(tmp), r)),
                ("filled", len(made), lambda r: ours(renamed(made, f"r{r}"), rx.url, grown)),
                ("bare", len(bodies), lambda r: bare(bodies, rx.url)),
                ("lean", len(bodies), lambda r: connections(bodies, rx.url)),
                ("sync", len(texts), lambda r: asyncio.to_thread(apprise_sync, texts, rx.url)),
                ("async", len(texts), lambda r: apprise_async(texts, rx.url)),
            ]
            for round_ in range(rounds):
                for name, count, contender in contenders:
                    seconds = await contender(round_)
                    expected += count
                    rates[name].append(count / seconds)
            await rx.wait_for(expected, within=30)
            if (got := await rx.count()) != expected:
                raise RuntimeError(f"the receiver got {got} POSTs, expected {expected}")
    return rates


def run(quick: bool = False) -> list[Row]:
    # apprise: 1,000 messages a round (about 1.5 s at its 600-700/s). At 500 a cold first round
    # read up to 20% low; at 1,000 the rounds stay within about 10% of each other.
    events, apprise_events, rounds = (200, 50, 1) if quick else (5_000, 1_000, 5)
    filled = 400 if quick else FILLED
    measured = asyncio.run(_measure(events, apprise_events, rounds, filled))
    rates = {name: statistics.median(values) for name, values in measured.items()}
    ours_rate = rates["ours"]

    def share_of(name: str, peer: str = "bare") -> float:
        # Round by round (the two ran seconds apart), then the median of those: steadier on a
        # noisy machine than the ratio of the two medians.
        pairs = zip(measured[name], measured[peer], strict=True)
        return statistics.median(o / b for o, b in pairs)

    share, grown_share = share_of("ours"), share_of("filled")
    own_share = share_of("ours", "lean")
    return [
        Row(
            f"Delivery of {events:,} events, durable outbox -> signed webhook in another process, "
            f"vs a bare pooled aiohttp client (same bodies, {CONCURRENCY} in flight each)",
            fmt_rate(ours_rate),
            fmt_rate(rates["bare"]),
            f"{share:.0%}",
            ">= 80%: " + ("met" if share >= 0.8 else "NOT met"),
            short=f"Delivery, {events:,} events via the outbox, vs bare aiohttp",
        ),
        Row(
            f"The same into a database already holding {filled:,} delivered events (a bridge that "
            f"has run for a while; {events:,} more each round) vs the bare client",
            fmt_rate(rates["filled"]),
            fmt_rate(rates["bare"]),
            f"{grown_share:.0%}",
            ">= 75%: " + ("met" if grown_share >= 0.75 else "NOT met"),
            short=f"Delivery into a database of {filled:,} events, vs bare aiohttp",
        ),
        Row(
            f"Delivery of {events:,} events vs the webhook target's own connections posting the "
            "same bodies bare (no outbox, no signature): what durability and signing cost",
            fmt_rate(ours_rate),
            fmt_rate(rates["lean"]),
            f"{own_share:.0%}",
            "—",
            short="Delivery via the outbox, vs the same connections bare",
        ),
        Row(
            f"Delivery vs apprise json:// `notify` (sync, {apprise_events:,} messages)",
            fmt_rate(ours_rate),
            fmt_rate(rates["sync"]),
            ratio(ours_rate, rates["sync"]),
            ">= 5x: " + ("met" if ours_rate >= 5 * rates["sync"] else "NOT met"),
            short="Delivery vs apprise json:// notify",
        ),
        Row(
            f"Delivery vs apprise json:// `async_notify` ({apprise_events:,} messages, "
            f"{CONCURRENCY} in flight)",
            fmt_rate(ours_rate),
            fmt_rate(rates["async"]),
            ratio(ours_rate, rates["async"]),
            ">= 5x: " + ("met" if ours_rate >= 5 * rates["async"] else "NOT met"),
            short="Delivery vs apprise json:// async_notify",
        ),
    ]

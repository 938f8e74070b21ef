"""Figure: the whole process, beside the per-stage figures. Peak RSS of `bridge`'s process with
100,000 tracked tasks in list mode (vs the size of the list's JSON answer); start-up to the first
poll with a database of 100,000 tasks and many events (vs sqlite3's own full scan of that file);
the retention prune of that database (vs sqlite3's own DELETE of the same rows).

The database is built through the store's own schema (SqliteStore.open creates it), then filled by
bulk inserts (executemany, one transaction): 1,000,000 events by default (about 25 s to build, a
file of about 500 MB; the figure takes about 80 s in all); BENCH_EVENTS=200000 for a shorter run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import Row, fmt_bytes, fmt_time, ratio
from bench.diff import get_bytes
from bench.latency import API_KEY, running
from bench.report import ROOT
from bridge.app import Bridge
from bridge.config import Config
from bridge.simulator import Simulator
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_outbox import id_hash

SOURCE = "mj"
EVENT_JSON = (
    b'{"specversion":"1.0","type":"task.succeeded","data":{"task":{"id":"%d"}}}' + b" " * 200
)


def config(url: str, interval: str = "1h") -> Config:
    source = {"name": SOURCE, "base_url": url, "api_key": API_KEY, "auth": "mj-api-secret"}
    return Config.model_validate(
        {"sources": [{**source, "poll_interval": interval, "mode": "list"}]}
    )


def build_db(path: Path, tasks: int, events: int, old: float) -> None:
    """A database of `tasks` finished tasks and `events` events, each with one sent delivery,
    all `old` (unix seconds): the store's schema, then bulk inserts."""

    async def schema() -> None:
        store = await SqliteStore.open(str(path))
        await store.close()

    asyncio.run(schema())
    db = sqlite3.connect(path)
    try:
        with db:
            db.executemany(
                "INSERT INTO tasks (source, id, status, progress, changed_at, finished) "
                "VALUES (?, ?, 'SUCCESS', 100, ?, 1)",
                ((SOURCE, f"t{i}", old) for i in range(tasks)),
            )
            db.execute("INSERT INTO sources (name, seen) VALUES (?, 1)", (SOURCE,))
            db.executemany(
                "INSERT INTO events (seq, id, h, type, source, subject, time, json) "
                "VALUES (?, ?, ?, 'task.succeeded', ?, ?, ?, ?)",
                (
                    (i + 1, f"e{i}", id_hash(f"e{i}"), SOURCE, f"t{i % tasks}", old, EVENT_JSON % i)
                    for i in range(events)
                ),
            )
            db.executemany(
                "INSERT INTO outbox (id, target, rule, event_seq, title, body, created_at, "
                "next_at, updated_at, attempts, state) "
                "VALUES (?, 'hook', 'all', ?, 't', 'b', ?, ?, ?, 1, 'sent')",
                ((f"d{i}", i + 1, old, old, old) for i in range(events)),
            )
    finally:
        db.close()


def sqlite_scan(path: Path) -> float:
    """sqlite3's own full scan of the file: every task and every event's JSON read once."""
    started = time.perf_counter()
    db = sqlite3.connect(path)
    try:
        db.execute("SELECT count(*), sum(progress) FROM tasks").fetchall()
        db.execute("SELECT count(*), sum(length(json)) FROM events").fetchall()
        db.execute("SELECT count(*), sum(attempts) FROM outbox").fetchall()
    finally:
        db.close()
    return time.perf_counter() - started


def sqlite_delete(path: Path, before: float) -> float:
    """sqlite3's own DELETE of what the prune deletes (sent deliveries, then old events)."""
    started = time.perf_counter()
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("DELETE FROM outbox WHERE state = 'sent' AND updated_at < ?", (before,))
            db.execute("DELETE FROM events WHERE time < ?", (before,))
    finally:
        db.close()
    return time.perf_counter() - started


async def start_up(path: Path) -> float:
    """From Bridge.run() to the end of its first poll (store opened, states loaded, one list)."""
    sim = Simulator("midjourney-proxy", api_key=API_KEY)
    sim.seed_tasks(100)
    await sim.start()
    try:
        started = time.perf_counter()
        bridge = Bridge(config(sim.url), str(path))
        async with running(bridge):
            watcher = (await bridge.wait_started()).watchers[SOURCE]
            async with asyncio.timeout(120):
                while watcher.status.polls < 1:  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.005)
            return time.perf_counter() - started
    finally:
        await sim.stop()


async def prune(path: Path, before: float) -> tuple[float, int]:
    store = await SqliteStore.open(str(path))
    try:
        started = time.perf_counter()
        _, events = await store.prune(before)
        return time.perf_counter() - started, events
    finally:
        await store.close()


async def peak_rss(tasks: int, db: Path) -> tuple[int, int]:
    """VmHWM of a `bridge` process (python -m bench.process URL DB: the real Bridge, list mode)
    after its first two polls of a `tasks`-task list, and the size of that list's JSON answer."""
    sim = Simulator("midjourney-proxy", api_key=API_KEY)
    sim.seed_tasks(tasks)
    await sim.start()
    try:
        async with aiohttp.ClientSession(headers={"mj-api-secret": API_KEY}) as session:
            answer = len(await get_bytes(session, sim.url + "/mj/task/list"))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.process", sim.url, str(db),
            cwd=ROOT, stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the bridge process exited {child.returncode}")
        return int(out.split()[-1]), answer
    finally:
        await sim.stop()


async def _child(url: str, db: str) -> int:
    bridge = Bridge(config(url, "5s"), db)  # the default interval
    async with running(bridge):
        watcher = (await bridge.wait_started()).watchers[SOURCE]
        async with asyncio.timeout(600):
            while watcher.status.polls < 2:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.05)
    return _vmhwm()


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(quick: bool = False) -> list[Row]:
    tasks = 2_000 if quick else 100_000
    events = 5_000 if quick else int(os.environ.get("BENCH_EVENTS", "1000000"))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        rss, answer = asyncio.run(peak_rss(tasks, Path(tmp) / "rss.db"))
        rows.append(
            Row(
                f"Peak RSS of the bridge process, {tasks:,} tracked tasks in list mode (two polls)"
                " vs the size of the list's JSON answer",
                fmt_bytes(rss),
                fmt_bytes(answer),
                ratio(rss, answer),
                short=f"Peak RSS, {tasks:,} tasks in list mode, vs the list's JSON size",
            )
        )
        path = Path(tmp) / "big.db"
        old = time.time() - 400 * 86400
        begun = time.perf_counter()
        build_db(path, tasks, events, old)
        built = time.perf_counter() - begun
        size = path.stat().st_size
        copy = Path(tmp) / "copy.db"
        shutil.copy(path, copy)
        scan = sqlite_scan(copy)
        up = asyncio.run(start_up(copy))
        what = f"{tasks:,} tasks, {events:,} events ({fmt_bytes(size)}, built in {built:.0f} s)"
        rows.append(
            Row(
                f"Start-up to the end of the first poll, database of {what} vs sqlite3's own full "
                "scan of that file",
                fmt_time(up),
                fmt_time(scan),
                ratio(up, scan),
                short=f"Start-up to first poll, {tasks:,} tasks + {events:,} events, vs a scan",
            )
        )
        shutil.copy(path, copy)
        took, pruned = asyncio.run(prune(copy, time.time()))
        shutil.copy(path, copy)
        delete = sqlite_delete(copy, time.time())
        rows.append(
            Row(
                f"Retention prune of {pruned:,} events and their deliveries ({what}) vs sqlite3's "
                "own DELETE of the same rows in one transaction",
                fmt_time(took),
                fmt_time(delete),
                ratio(took, delete),
                short=f"Retention prune, {events:,} events, vs sqlite3's DELETE",
            )
        )
    return rows


if __name__ == "__main__":
    print(asyncio.run(_child(sys.argv[1], sys.argv[2])))

"""The store shared as operators share it: commands run beside a live `bridge run`, and two
`bridge run` on one SQLite file. Counted at a real receiver: every delivery arrives, none twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from bridge.simulator import Simulator
from tests.receiver import Receiver, Reply

ROOT = Path(__file__).resolve().parent.parent
TASKS = 1000


def write_config(path: Path, sim: Simulator, rx: Receiver) -> None:
    path.write_text(
        f"""
sources:
  - name: mj
    base_url: {sim.url}
    api_key: k
    auth: mj-api-secret
    poll_interval: 200ms
    backfill: true
targets:
  hook:
    webhook: {rx.url}/events
    concurrency: 16
rules:
  - name: all
    on: "*"
    to: hook
"""
    )


async def bridge(*args: str, log: Path | None = None) -> asyncio.subprocess.Process:
    out = log.open("wb") if log is not None else None
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out or asyncio.subprocess.PIPE,
            stderr=out or asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        if out is not None:
            out.close()


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 20)


def doubled(rx: Receiver) -> int:
    counts = Counter(r.headers["webhook-id"] for r in rx.requests)
    return sum(n - 1 for n in counts.values())


async def test_commands_beside_a_running_bridge_send_nothing_twice(tmp_path: Path) -> None:
    db, config = tmp_path / "bridge.db", tmp_path / "rules.yaml"
    async with Simulator(api_key="k") as sim, Receiver(Reply(200, delay=0.05)) as rx:
        sim.seed_tasks(TASKS)
        write_config(config, sim, rx)
        run = await bridge("run", "-c", str(config), "--db", str(db), log=tmp_path / "run.log")
        try:
            await rx.wait_for(50, within=60)
            for _ in range(3):  # as an operator checks on it while it works
                listing = await bridge("dlq", "list", "--db", str(db))
                out, err = await listing.communicate()
                assert listing.returncode == 0, err.decode()
                assert b"no dead letters" in out
            async with asyncio.timeout(120):
                while len({r.headers["webhook-id"] for r in rx.requests}) < TASKS:
                    await rx.wait_for(len(rx.requests) + 1, within=60)
            await asyncio.sleep(0.5)  # any late repeat would arrive by now
        finally:
            assert await stop(run) == 0, (tmp_path / "run.log").read_text()
    assert doubled(rx) == 0


async def test_two_bridges_on_one_sqlite_file_send_nothing_twice(tmp_path: Path) -> None:
    db, config = tmp_path / "bridge.db", tmp_path / "rules.yaml"
    async with Simulator(api_key="k") as sim, Receiver(Reply(200, delay=0.05)) as rx:
        sim.seed_tasks(TASKS)
        write_config(config, sim, rx)
        first = await bridge("run", "-c", str(config), "--db", str(db), log=tmp_path / "a.log")
        second: asyncio.subprocess.Process | None = None
        try:
            await rx.wait_for(50, within=60)
            second = await bridge("run", "-c", str(config), "--db", str(db), log=tmp_path / "b.log")
            async with asyncio.timeout(120):
                while len({r.headers["webhook-id"] for r in rx.requests}) < TASKS:
                    await rx.wait_for(len(rx.requests) + 1, within=60)
            await asyncio.sleep(0.5)
        finally:
            codes = [await stop(p) for p in (first, second) if p is not None]
    print("duplicates:", doubled(rx), "codes:", codes)
    assert doubled(rx) == 0

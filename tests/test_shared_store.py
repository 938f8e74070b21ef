"""The store shared as operators share it: commands run beside a live `bridge run`, and two
`bridge run` on one SQLite file. Counted at a real receiver: every delivery arrives, none twice."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from bridge.simulator import Simulator
from bridge.store import Store
from tests import pg
from tests.conftest import bridge
from tests.receiver import Receiver, Reply, make_delivery, make_event

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


# -- every command that opens the store, on both backends -----------------------------------------

PASSWORD = "hunter2-not-shown"


def with_password(url: str) -> str:
    """The test server trusts local connections: a password in the URL is accepted, and must
    never be printed."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


async def command(*args: str) -> tuple[int, str]:
    proc = await bridge(*args)
    out, err = await proc.communicate()
    text = out.decode() + err.decode()
    assert PASSWORD not in text
    assert proc.returncode is not None
    return proc.returncode, text


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_every_command_works_on_both_backends_and_never_shows_a_password(
    backend: str, tmp_path: Path
) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text(
        "sources:\n  - name: mj\n    base_url: http://127.0.0.1:9\n    api_key: k\n"
        "targets:\n  hook:\n    webhook: http://127.0.0.1:9/hook\n"
        "rules:\n  - name: all\n    on: '*'\n    to: hook\n"
    )
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            db = with_password(await stack.enter_async_context(pg.database()))
        else:
            db = str(tmp_path / "bridge.db")
        async with await Store.open(db) as store:  # a bridge ran and one delivery failed for good
            event = make_event(1)
            await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
            [item] = await store.claim("hook", time.time(), 10)
            await store.mark_dead(item.id, "hook: HTTP 410")

        code, out = await command("dlq", "list", "--db", db)
        assert (code, item.id in out, "HTTP 410" in out) == (0, True, True)
        code, out = await command("dlq", "replay", item.id, "--db", db)
        assert (code, "replayed 1 dead letter" in out) == (0, True)
        code, out = await command("track", "-c", str(config), "--db", db, "mj", "t-1", "t-2")
        assert (code, "2 new task id(s) stored" in out) == (0, True)
        async with await Store.open(db, readonly=True) as store:
            assert await store.outbox_depth() == {"hook": 1}
            assert set(await store.load_tasks("mj")) == {"t-1", "t-2"}

        if backend == "postgres":  # a database that is not there: a plain line, no password
            missing = db.rsplit("/", 1)[0] + "/bridge_no_such_db"
            code, out = await command("dlq", "list", "--db", missing)
            assert code == 1
            assert "bridge_no_such_db" in out
            assert "Traceback" not in out

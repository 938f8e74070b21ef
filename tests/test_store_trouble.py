"""The store in trouble and the source health it keeps, with a real bridge, simulator and
receiver: a disk that fills during a burst and is freed (nothing lost, nothing sent twice, not
ready meanwhile), a corrupt page met by pruning (logged, the bridge goes on), and an outage that
outlives a reload or a change of leader (one source.down, one source.up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.errors import StoreError
from bridge.models import Event, TaskState
from bridge.simulator import Simulator
from bridge.store import Store
from bridge.store.sqlite import SqliteStore
from tests import pg
from tests.receiver import Receiver
from tests.test_app import config, running, until

TERMINAL = {"task.succeeded", "task.failed", "task.cancelled"}


def received(rx: Receiver) -> list[dict[str, Any]]:
    return [r.json() for r in rx.requests]


async def test_a_write_cancelled_while_it_waits_to_begin_leaves_the_store_usable(
    tmp_path: Path,
) -> None:
    # A reload or a shutdown cancels whatever the store was doing. Cancelled while its BEGIN
    # waited for another writer's lock, a write used to leave the transaction begun (the database
    # thread went on with it), so every later write failed 'cannot start a transaction within a
    # transaction' until the bridge gave up and stopped.
    path = tmp_path / "b.db"
    state = TaskState("SUCCESS", 100, time.time(), finished=True)
    async with await Store.open(str(path)) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process writing: BEGIN waits for it
            write = asyncio.create_task(store.commit("mj", {"t1": state}, [], []))
            await asyncio.sleep(0.3)  # well inside the busy timeout: BEGIN is waiting
            write.cancel()
            await asyncio.sleep(0.05)  # the cancel is delivered; the BEGIN still waits
            other.execute("COMMIT")  # now it goes through, on the database thread
            with pytest.raises(asyncio.CancelledError):
                await write
        finally:
            other.close()
        async with asyncio.timeout(10):
            await store.commit("mj", {"t2": state}, [], [])
        assert set(await store.load_tasks("mj")) == {"t2"}  # the cancelled one left nothing


async def test_a_full_disk_during_a_burst_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "b.db")
    async with Simulator(api_key="k") as sim, Receiver() as rx:
        bridge = Bridge(config(sim, rx), db)
        async with running(bridge):
            live = await bridge.wait_started()
            store = live.store
            assert isinstance(store, SqliteStore)
            watcher = live.watchers["mj"]
            await until(lambda: watcher.status.polls >= 1)  # first contact recorded
            # The disk is full: the file may not grow by a page. max_page_count belongs to the
            # connection, so the test sets it on the bridge's own.
            connection = store._db
            [(pages,)] = await connection.execute_fetchall("PRAGMA page_count")
            await connection.execute(f"PRAGMA max_page_count = {pages}")
            ids = [sim.add_task(f"burst {n}", steps=2) for n in range(400)]
            sim.tick()
            await until(lambda: store.retrier.trouble is not None)
            assert "full" in (store.retrier.trouble or "")
            retries = bridge.metrics.registry.get_sample_value(
                "bridge_store_retries_total", {"kind": "disk full"}
            )
            assert retries
            await connection.execute("PRAGMA max_page_count = 1073741823")  # space again
            await until(lambda: ended(rx) >= set(ids), sim)
            assert store.retrier.trouble is None
        async with await Store.open(db, readonly=True) as check:
            assert await check.outbox_depth() == {}
            stored = {e.id for e in await check.recent_events(100_000)}
    delivered = Counter(r.headers["webhook-id"] for r in rx.requests)
    assert [k for k, n in delivered.items() if n > 1] == []  # 0 duplicates
    assert stored - set(delivered) == set()  # 0 lost: every stored event arrived


def ended(rx: Receiver) -> set[str]:
    return {e["subject"] for e in received(rx) if e["type"] in TERMINAL}


async def test_a_corrupt_page_met_by_pruning_is_logged_and_the_bridge_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "b.db")
    async with await Store.open(db) as store:  # old events, enough for several index pages
        old = time.time() - 30 * 86400
        events = [
            Event(f"old-{n}", "task.succeeded", "mj", str(n), _when(old + n)) for n in range(4000)
        ]
        await store.commit("mj", {"x": TaskState("SUCCESS", 100, old, finished=True)}, events, [])
    corrupt_oldest_time_index_page(db)
    caplog.set_level(logging.WARNING, "bridge.retention")
    async with Simulator(api_key="k") as sim, Receiver() as rx:
        bridge = Bridge(config(sim, rx, retention="7d"), db)
        async with running(bridge):
            await until(lambda: "pruning failed" in caplog.text)
            assert "malformed" in caplog.text
            tid = sim.add_task("after the prune", steps=1)
            await until(lambda: tid in ended(rx), sim)  # and it still delivers


def corrupt_oldest_time_index_page(db: str) -> None:
    """The oldest leaf of the events' time index goes bad: only pruning walks it (new events go
    to the other end)."""
    with sqlite3.connect(db) as conn:
        [(page,)] = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'events_time' AND pagetype = 'leaf' "
            "ORDER BY path LIMIT 1"
        ).fetchall()
        [(size,)] = conn.execute("PRAGMA page_size").fetchall()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with Path(db).open("r+b") as raw:
        raw.seek((page - 1) * size)
        raw.write(b"\xde\xad\xbe\xef" * (size // 4))


def _when(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def health_events(rx: Receiver) -> list[dict[str, Any]]:
    return [e for e in received(rx) if e["type"] in ("source.down", "source.up")]


async def test_an_outage_outlives_a_reload_one_down_and_one_up(tmp_path: Path) -> None:
    async with Simulator(api_key="k") as sim, Receiver() as rx:
        cfg = config(sim, rx)
        bridge = Bridge(cfg, str(tmp_path / "b.db"))
        async with running(bridge):
            live = await bridge.wait_started()
            await until(lambda: live.watchers["mj"].status.polls >= 1)
            sim.fault = "500"
            await until(lambda: health_events(rx))
            bridge.swap(cfg.model_copy())  # a reload while the source is down
            reloaded = await _next_running(bridge, live)
            polls = len(sim.requests)
            await until(lambda: len(sim.requests) >= polls + 3)  # failing on after the reload
            sim.fault = None
            await until(lambda: reloaded.watchers["mj"].status.up)
            await until(lambda: len(health_events(rx)) >= 2)
            await _polls(sim, 3)  # anything more would come by now
    _one_outage(health_events(rx))


async def _next_running(bridge: Bridge, old: Any) -> Any:
    async with asyncio.timeout(15):
        while bridge.running is old or bridge.running is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return await bridge.wait_started()


async def _polls(sim: Simulator, n: int) -> None:
    seen = len(sim.requests)
    async with asyncio.timeout(15):
        while len(sim.requests) < seen + n:  # noqa: ASYNC110 (the simulator's own list)
            await asyncio.sleep(0.02)


def _one_outage(events: list[dict[str, Any]]) -> None:
    assert [e["type"] for e in events] == ["source.down", "source.up"], events
    down, up = events
    assert down["data"]["since"] == up["data"]["since"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_an_outage_outlives_a_change_of_leader_one_down_and_one_up(
    backend: str, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        db = str(tmp_path / "b.db")
        if backend == "postgres":
            db = await stack.enter_async_context(pg.database())
        sim = await stack.enter_async_context(Simulator(api_key="k"))
        rx = await stack.enter_async_context(Receiver())
        cfg = config(sim, rx)
        first, second = Bridge(cfg, db), Bridge(cfg, db)
        async with running(first):
            await until(lambda: first.running is not None and first.running.watchers["mj"].leading)
            await until(
                lambda: first.running is not None and first.running.watchers["mj"].status.polls >= 1
            )
            async with running(second):
                sim.fault = "500"
                await until(lambda: health_events(rx))
                first.stop()  # the leader goes; the other one takes the source over, still down
                await until(
                    lambda: second.running is not None and second.running.watchers["mj"].leading
                )
                await _polls(sim, 3)
                sim.fault = None
                await until(lambda: len(health_events(rx)) >= 2)
                await _polls(sim, 3)
    _one_outage(health_events(rx))


async def test_a_store_that_stays_broken_stops_the_bridge_cleanly_with_one_line(
    tmp_path: Path,
) -> None:
    async with Simulator(api_key="k") as sim, Receiver() as rx:
        bridge = Bridge(config(sim, rx), str(tmp_path / "b.db"))
        task = asyncio.create_task(bridge.run())
        live = await bridge.wait_started()
        store = live.store
        assert isinstance(store, SqliteStore)
        await until(lambda: live.watchers["mj"].status.polls >= 1)
        store.retrier.retry_for = 0.5  # the default minute, shortened for the test
        [(pages,)] = await store._db.execute_fetchall("PRAGMA page_count")
        await store._db.execute(f"PRAGMA max_page_count = {pages}")  # full, and it stays full
        for n in range(200):
            sim.add_task(f"t{n}")
        sim.tick()
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(task, 30)
    assert "full" in str(info.value)
    assert "stopped" in str(info.value)
    assert "\n" not in str(info.value)  # cli.py prints it as one line, exit 1


class FullDisk:
    """A store's leases whose writes fail as a full disk does, while `full` is set."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.full = False
        self.failed = 0

    def _check(self) -> None:
        if self.full:
            self.failed += 1
            raise StoreError("database b.db: database or disk is full", transient=True)

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        self._check()
        return await self.store.try_lease(name, holder, ttl)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        self._check()
        return await self.store.renew_lease(name, holder, ttl)

    async def release_lease(self, name: str, holder: str) -> None:
        self._check()
        await self.store.release_lease(name, holder)

    async def lease(self, name: str) -> tuple[str, float] | None:
        return await self.store.lease(name)


async def test_a_full_disk_during_lease_renewal_pauses_polling_and_never_raises(
    tmp_path: Path,
) -> None:
    from bridge.lease import while_leader

    async with await Store.open(str(tmp_path / "b.db")) as store:
        disk = FullDisk(store)
        runs: list[asyncio.Event] = []

        async def body() -> None:
            runs.append(asyncio.Event())
            await asyncio.Event().wait()

        leading = asyncio.create_task(while_leader(disk, "source:mj", "me", 0.3, body))
        async with asyncio.timeout(10):
            while not runs:  # noqa: ASYNC110 (the body's own list)
                await asyncio.sleep(0.01)
            disk.full = True
            while disk.failed < 5:  # noqa: ASYNC110 (renewals, then attempts to take it again)
                await asyncio.sleep(0.01)
            assert not leading.done()  # no traceback, no exit: it waits for the disk
            disk.full = False
            while len(runs) < 2:  # noqa: ASYNC110 (the lease is taken again, polling resumes)
                await asyncio.sleep(0.01)
        leading.cancel()
        await asyncio.gather(leading, return_exceptions=True)

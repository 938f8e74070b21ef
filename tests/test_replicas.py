"""Several replicas on one store: a source's poll loop runs in exactly one of them (the lease
holder); when it dies or loses the lease another takes over; and, end to end, three `bridge run`
processes on one PostgreSQL with the leader SIGKILLed midway lose nothing and send nothing under
two ids."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from standardwebhooks.webhooks import Webhook

from bridge.lease import MIN_TTL, lease_ttl, source_lease, while_leader
from bridge.simulator import Simulator
from bridge.store import Store
from tests import pg
from tests.conftest import bridge
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
TTL = 0.3


class Body:
    """A poll loop stand-in: records when it runs and whether it was cancelled."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.runs = 0
        self.cancelled = 0

    async def __call__(self) -> None:
        self.runs += 1
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.running.clear()
            raise


class Asking:
    """A store's leases, noting when a request for one was refused."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.refused = asyncio.Event()

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        taken = await self.store.try_lease(name, holder, ttl)
        if not taken:
            self.refused.set()
        return taken

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        return await self.store.renew_lease(name, holder, ttl)

    async def release_lease(self, name: str, holder: str) -> None:
        await self.store.release_lease(name, holder)

    async def lease(self, name: str) -> tuple[str, float] | None:
        return await self.store.lease(name)


async def test_only_the_holder_runs_and_a_stop_hands_over_at_once(store: Store) -> None:
    a, b = Body(), Body()
    lead_a = asyncio.create_task(while_leader(store, "source:mj", "a", TTL, a))
    await asyncio.wait_for(a.running.wait(), 5)
    asking = Asking(store)
    lead_b = asyncio.create_task(while_leader(asking, "source:mj", "b", TTL, b))
    for _ in range(3):  # b asks again and again (every TTL/2 at most) and is told to wait
        asking.refused.clear()
        await asyncio.wait_for(asking.refused.wait(), 5)
    assert (a.runs, b.runs) == (1, 0)

    lead_a.cancel()  # a clean stop releases the lease: b need not wait for it to expire
    await asyncio.gather(lead_a, return_exceptions=True)
    assert a.cancelled == 1
    held = await store.lease("source:mj")
    assert held is None or held[0] == "b"  # released at once, not left to run out
    await asyncio.wait_for(b.running.wait(), 5)
    lead_b.cancel()
    await asyncio.gather(lead_b, return_exceptions=True)
    assert await store.lease("source:mj") is None


async def test_a_dead_holders_lease_is_taken_when_it_expires(store: Store) -> None:
    assert await store.try_lease("source:mj", "dead", TTL)  # and never renewed
    b = Body()
    started = time.monotonic()
    lead_b = asyncio.create_task(while_leader(store, "source:mj", "b", TTL, b))
    await asyncio.wait_for(b.running.wait(), 5)
    assert time.monotonic() - started >= TTL * 0.8
    lead_b.cancel()
    await asyncio.gather(lead_b, return_exceptions=True)


async def test_a_lost_lease_cancels_the_body_and_it_runs_again_when_regained(store: Store) -> None:
    a = Body()
    lead_a = asyncio.create_task(while_leader(store, "source:mj", "a", TTL, a))
    await asyncio.wait_for(a.running.wait(), 5)
    # Someone else holds it now (as when a stalled holder's lease ran out and was taken).
    await store.release_lease("source:mj", "a")
    assert await store.try_lease("source:mj", "thief", TTL)
    async with asyncio.timeout(5):
        while a.cancelled == 0:  # noqa: ASYNC110 (counted by the body)
            await asyncio.sleep(0.01)
    assert not a.running.is_set()
    await store.release_lease("source:mj", "thief")
    await asyncio.wait_for(a.running.wait(), 5)
    assert a.runs == 2
    lead_a.cancel()
    await asyncio.gather(lead_a, return_exceptions=True)


async def test_a_failing_body_releases_the_lease_and_raises(store: Store) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await while_leader(store, "source:mj", "a", TTL, broken)
    assert await store.lease("source:mj") is None


async def test_a_holder_whose_loop_stalls_keeps_a_lease_nobody_else_took(store: Store) -> None:
    """The poll holds the event loop longer than the whole lease, again and again, with a renewal
    in flight (CPU-heavy parsing does this): no other replica took the lease meanwhile, so the
    late answer says it is still ours, and the poll is never stopped and started over."""
    runs = 0

    async def stalling() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            return  # started over: the lease was taken as lost
        for _ in range(6):
            time.sleep(TTL * 1.5)  # noqa: ASYNC251 (what a long parse does to the loop)
            await asyncio.sleep(0)  # one turn of the loop: a renewal goes out, no answer read

    await asyncio.wait_for(while_leader(store, "source:mj", "a", TTL, stalling), 30)
    assert runs == 1
    assert await store.lease("source:mj") is None  # handed back when the body returned


def test_the_lease_outlives_a_late_renewal_and_a_dead_holder_is_replaced_soon() -> None:
    for interval in (0.05, 0.2, 1.0, 5.0, 60.0):
        ttl = lease_ttl(interval)
        assert ttl / 3 < ttl - ttl / 3  # a renewal may be late by a whole period
        # However short the interval, the lease outlasts a stall or a slow round trip of seconds;
        # a dead holder is replaced within those seconds, or two intervals when they are longer.
        assert ttl >= MIN_TTL
        assert ttl < max(2 * interval, MIN_TTL + 1)
    assert source_lease("mj") == "source:mj"


# -- three replica processes ----------------------------------------------------------------

POLL = 0.25
TASKS = 2000
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TERMINAL = {"task.succeeded", "task.failed", "task.cancelled"}
OUTCOMES = ("success", "success", "success", "failure", "cancel")


def write_config(path: Path, sim: Simulator, rx: Receiver) -> None:
    path.write_text(
        f"""
sources:
  - name: mj
    base_url: {sim.url}
    api_key: k
    auth: mj-api-secret
    poll_interval: {int(POLL * 1000)}ms
targets:
  hook:
    webhook: {rx.url}/events
    secret: {SECRET}
    concurrency: 8
rules:
  - name: changes
    on: [task.submitted, task.started, task.succeeded, task.failed, task.cancelled]
    to: hook
"""
    )


async def start_replica(config: Path, db: str, log: Path) -> asyncio.subprocess.Process:
    return await bridge("run", "-c", str(config), "--db", db, log=log)


async def leader_pid(url: str) -> int | None:
    conn = await asyncpg.connect(url)
    try:
        holder = await conn.fetchval(
            "SELECT holder FROM leases WHERE name = $1 AND expires_at > clock_timestamp()",
            source_lease("mj"),
        )
    finally:
        await conn.close()
    return int(holder.split(":")[1]) if holder else None


class PollClock:
    """When the simulator was last asked anything (only the leader asks it)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.times: list[float] = []
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        seen = len(self.sim.requests)
        while True:
            await asyncio.sleep(0.005)
            if len(self.sim.requests) != seen:
                seen = len(self.sim.requests)
                self.times.append(time.monotonic())

    def first_after(self, moment: float) -> float | None:
        return next((t for t in self.times if t > moment), None)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_three_replicas_share_one_postgres_and_survive_the_leaders_sigkill(
    tmp_path: Path,
) -> None:
    url = pg.server()
    async with pg.database(url) as db_url, Simulator(api_key="k") as sim, Receiver() as rx:
        db = db_url + "?claim_timeout=2"
        config = tmp_path / "rules.yaml"
        write_config(config, sim, rx)
        procs = [await start_replica(config, db, tmp_path / f"replica{i}.log") for i in range(3)]
        clock = PollClock(sim)
        try:
            async with asyncio.timeout(90):
                # first contact (silent) done by whichever replica took the lease
                while len(sim.requests) < 2:  # noqa: ASYNC110 (the simulator's own list)
                    await asyncio.sleep(0.05)
                ids = await run_tasks(sim, rx, procs, db_url, clock)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await clock.stop()

    verifier = Webhook(SECRET)
    by_change: dict[tuple[str, str], set[str]] = defaultdict(set)
    for req in rx.requests:
        body = verifier.verify(req.body, req.headers)
        assert req.headers["webhook-id"] == body["id"]
        by_change[(body["subject"], body["type"])].add(body["id"])
    doubled = {k: v for k, v in by_change.items() if len(v) > 1}
    assert not doubled, f"changes delivered under two ids: {list(doubled.items())[:5]}"
    ended = {subject for subject, kind in by_change if kind in TERMINAL}
    assert ended == set(ids), f"{len(set(ids) - ended)} tasks without their terminal event"


async def run_tasks(
    sim: Simulator,
    rx: Receiver,
    procs: list[asyncio.subprocess.Process],
    db_url: str,
    clock: PollClock,
) -> list[str]:
    """Add TASKS tasks in waves while ticking; kill the leader halfway; wait for every end."""
    ids: list[str] = []
    pids = {p.pid: p for p in procs}
    killed_at: float | None = None
    waves = 20
    for wave in range(waves):
        for i in range(TASKS // waves):
            n = wave * (TASKS // waves) + i
            ids.append(sim.add_task(f"task {n}", outcome=OUTCOMES[n % len(OUTCOMES)], steps=2))
        sim.tick()
        await asyncio.sleep(POLL)
        if wave == waves // 2:
            pid = await leader_pid(db_url)
            assert pid in pids, f"the lease holder {pid} is not one of the replicas"
            pids[pid].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert await pids[pid].wait() == -signal.SIGKILL
    assert killed_at is not None
    wanted = set(ids)
    ended: set[str] = set()
    read = 0
    while not wanted <= ended:
        sim.tick()
        await asyncio.sleep(POLL)
        for req in rx.requests[read:]:
            body = req.json()
            if body["type"] in TERMINAL:
                ended.add(body["subject"])
        read = len(rx.requests)
    # Polling resumed on another replica (how soon is the lease arithmetic's business, checked
    # without a clock in test_the_lease_outlives_a_late_renewal_and_a_dead_holder_is_replaced_soon).
    assert clock.first_after(killed_at) is not None
    return ids


# -- a first contact longer than a lease ------------------------------------------------------

BIG = 20_000  # tasks: parsing, diffing and storing them takes seconds, far longer than 0.3 s


async def test_replicas_finish_a_first_contact_far_longer_than_the_poll_interval(
    tmp_path: Path,
) -> None:
    """Two replicas poll every 200 ms; the first contact reads 20,000 tasks. The replica that
    takes the lease keeps it through that poll (it used to lose it to the other one midway,
    again and again, so the tasks were never recorded and nothing new was ever reported): the
    tasks are recorded once, and a task added afterwards is reported."""
    async with pg.database() as db, Simulator(api_key="k") as sim, Receiver() as rx:
        sim.seed_tasks(BIG)
        config = tmp_path / "rules.yaml"
        config.write_text(
            f"""
sources:
  - name: mj
    base_url: {sim.url}
    api_key: k
    auth: mj-api-secret
    mode: list
    poll_interval: 200ms
targets:
  hook:
    webhook: {rx.url}/events
rules:
  - name: all
    on: "*"
    to: hook
"""
        )
        logs = [tmp_path / f"replica{i}.log" for i in range(2)]
        procs = [await start_replica(config, db, log) for log in logs]

        def lost() -> list[str]:  # each such line is a poll stopped and started over
            return [
                line
                for log in logs
                for line in log.read_text().splitlines()
                if "lease lost" in line
            ]

        def recorded() -> int:
            return sum(log.read_text().count(f"first contact, recorded {BIG}") for log in logs)

        try:
            async with asyncio.timeout(60):
                while not recorded():
                    assert not lost(), lost()
                    await asyncio.sleep(0.1)
                tid = sim.add_task("after the first contact", outcome="success", steps=2)
                while not any(
                    r.json()["subject"] == tid and r.json()["type"] == "task.succeeded"
                    for r in rx.requests
                ):
                    sim.tick()
                    await asyncio.sleep(0.2)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(proc.wait(), 15) for proc in procs]
        assert not lost(), lost()
        assert recorded() == 1
        assert codes == [0, 0]

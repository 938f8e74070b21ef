"""/readyz and /healthz while polls take long: a poll in progress that has not failed keeps the
bridge ready (a first contact, a slow upstream), one that hangs stops counting once it fails by
the source's timeout, and liveness never depends on a poll."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from bridge.commands.track import track_command
from bridge.config import Config
from bridge.simulator import Simulator
from bridge.sources.health import SourceStatus, readiness
from tests import pg
from tests.conftest_browser import SIM_KEY, eventually, running_bridge
from tests.receiver import Receiver

INTERVAL = 0.1  # 3 intervals: 0.3 s
SLOW = 0.6  # seconds the upstream takes to answer: longer than 3 poll intervals
TIMEOUT = 2.0  # the source's timeout


@pytest.mark.parametrize(
    ("last_ok", "since", "moved", "failing", "ready", "says"),
    [
        (99.0, None, None, False, True, "ok (last poll 1.0s ago)"),
        (90.0, None, None, False, False, "no successful poll for 10.0s (limit 3s)"),
        (None, None, None, False, False, "no successful poll yet"),
        (None, 95.0, 95.0, False, True, "ok (first poll in progress for 5.0s)"),
        (None, 70.0, 98.0, False, True, "ok (first poll in progress for 30.0s)"),
        (None, 70.0, 86.0, False, False,
         "first poll in progress for 30.0s, stuck for 14.0s (limit 13s)"),
        (80.0, 90.0, 90.0, False, True, "ok (a poll in progress for 10.0s)"),
        (80.0, 86.9, 86.9, False, False,
         "a poll in progress for 13.1s, stuck for 13.1s (limit 13s)"),
        # A poll after a failed one gets no grace: every poll may be hanging until its timeout.
        (90.0, 99.0, 99.9, True, False, "no successful poll for 10.0s (limit 3s)"),
        (None, 99.0, 99.9, True, False, "no successful poll yet"),
        (99.5, 99.9, 99.9, True, True, "ok (last poll 0.5s ago)"),
    ],
    ids=[
        "fresh",
        "stale",
        "never",
        "first-poll-running",
        "first-poll-long-and-moving",
        "first-poll-stuck",
        "long-poll-running",
        "long-poll-stuck",
        "after-a-failure",
        "first-after-a-failure",
        "fresh-though-failing",
    ],
)  # fmt: skip
def test_readiness_counts_a_poll_in_progress_while_it_moves_on(
    last_ok: float | None,
    since: float | None,
    moved: float | None,
    failing: bool,
    ready: bool,
    says: str,
) -> None:
    status = SourceStatus("mj", last_ok=last_ok, polling_since=since, moved_at=moved)
    got = readiness(status, failing=failing, now=100.0, interval=1.0, timeout=10.0)
    assert got == (ready, says)


@pytest.fixture
async def slow_sim() -> AsyncIterator[Simulator]:
    """An upstream that takes SLOW seconds over every /mj/task/* answer."""
    async with Simulator(api_key=SIM_KEY) as sim:
        sim.seed_tasks(50)
        sim.fault, sim.hang_seconds = "timeout", SLOW
        yield sim


def config(sim: Simulator, rx: Receiver, *, timeout: float = TIMEOUT) -> Config:
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": sim.url,
                    "api_key": SIM_KEY,
                    "auth": "mj-api-secret",
                    "mode": "list",
                    "poll_interval": f"{INTERVAL * 1000:g}ms",
                    "timeout": f"{timeout:g}s",
                }
            ],
            "targets": {"hook": {"webhook": f"{rx.url}/hook"}},
            "rules": [{"name": "all", "on": ["task.*"], "to": ["hook"]}],
            "server": {"listen": "127.0.0.1:0"},
        }
    )


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def test_a_slow_first_poll_and_slow_polls_keep_the_bridge_ready_until_one_hangs(
    slow_sim: Simulator, rx: Receiver, tmp_path: Path
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        running_bridge(config(slow_sim, rx), tmp_path / "b.db", polled=()) as harness,
    ):
        watcher = harness.running.watchers["mj"]
        ready, live, page = f"{harness.url}/readyz", f"{harness.url}/healthz", f"{harness.url}/"

        # The first poll takes SLOW seconds, twice the readiness limit of 3 intervals. Only the
        # answers given while it ran (begun before the request, still running after it) count.
        during: dict[str, list[tuple[int, str]]] = {ready: [], live: [], page: []}
        longest = 0.0
        while watcher.status.polls == 0:
            for url, answers in during.items():
                since = watcher.status.polling_since
                answer = await get(http, url)
                if since is not None and watcher.status.polling_since == since:
                    answers.append(answer)
                    longest = max(longest, watcher.clock() - since)
        assert longest > 3 * INTERVAL  # the answers looked at span the interesting stretch
        assert all(during.values())
        for status, body in during[ready]:
            assert status == 200, body
            assert orjson.loads(body)["sources"]["mj"].startswith("ok (first poll in progress")
        assert set(during[live]) == {(200, "ok\n")}
        for status, html in during[page]:
            assert status == 200
            assert 'class="badge state-polling">polling<' in html

        # Every poll takes SLOW seconds: the source answers, however long each answer takes.
        polls = watcher.status.polls
        while watcher.status.polls < polls + 3:
            status, body = await get(http, ready)
            assert status == 200, body

        # Now it hangs past the source's timeout: that poll fails, and /readyz says so (the
        # polls after it, hanging as well, get no grace). /healthz still answers.
        slow_sim.hang_seconds = 30.0
        await eventually(lambda: watcher.failing, within=TIMEOUT + 5)
        status, body = await get(http, ready)
        assert status == 503, body
        assert orjson.loads(body)["sources"]["mj"].startswith("no successful poll for")
        assert await get(http, live) == (200, "ok\n")


async def test_a_first_poll_of_many_slow_answers_stays_ready_while_it_moves_on(
    rx: Receiver, tmp_path: Path
) -> None:
    """400 tracked ids the list lacks: the first poll is the list and four lookups of 100, each
    taking 0.5 s, far longer than 3 intervals plus the timeout (1.8 s) in all, but never that
    long without an answer: /readyz stays 200 through it."""
    async with Simulator(api_key=SIM_KEY) as sim:
        sim.seed_tasks(20)
        sim.fault, sim.hang_seconds = "timeout", 0.5
        cfg = config(sim, rx, timeout=1.5)
        db = tmp_path / "b.db"
        ids = [f"17000000000{i:05d}" for i in range(400)]
        assert await track_command(cfg, str(db), "mj", ids) == 0  # `bridge track` before `run`
        grace = 3 * INTERVAL + 1.5
        async with (
            aiohttp.ClientSession() as http,
            running_bridge(cfg, db, polled=()) as harness,
        ):
            watcher = harness.running.watchers["mj"]
            during: list[tuple[int, str]] = []
            longest = 0.0
            while watcher.status.polls == 0:
                since = watcher.status.polling_since
                answer = await get(http, f"{harness.url}/readyz")
                if since is not None and watcher.status.polling_since == since:
                    during.append(answer)
                    longest = max(longest, watcher.clock() - since)
            assert not watcher.failing
    assert longest > grace  # the poll ran past what its start alone would allow
    for status, body in during:
        assert status == 200, body
        assert orjson.loads(body)["sources"]["mj"].startswith("ok (first poll in progress")


async def test_a_replica_that_does_not_hold_the_lease_shows_its_source_on_standby(
    rx: Receiver, tmp_path: Path
) -> None:
    # Two replicas on one PostgreSQL database: one polls, the other waits for the lease. The
    # waiting one used to show the source as `waiting` (for a first poll that never comes).
    async with (
        pg.database() as db,
        Simulator(api_key=SIM_KEY) as sim,
        aiohttp.ClientSession() as http,
        running_bridge(config(sim, rx), db) as leader,
        running_bridge(config(sim, rx), db, polled=()) as standby,
    ):
        assert leader.running.watchers["mj"].status.polls  # the first holds the lease
        status, body = await get(http, f"{standby.url}/readyz")
        assert status == 200
        assert orjson.loads(body)["sources"] == {"mj": "polled by another replica"}
        _, page = await get(http, f"{standby.url}/")
        assert '<span class="badge state-standby">standby</span>' in page
        _, page = await get(http, f"{leader.url}/")
        assert '<span class="badge state-up">up</span>' in page

"""/readyz and /healthz while polls take long: a poll in progress that has not failed keeps the
bridge ready (a first contact, a slow upstream), one that hangs stops counting once it fails by
the source's timeout, and liveness never depends on a poll."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from bridge.config import Config
from bridge.simulator import Simulator
from bridge.sources.health import SourceStatus, readiness
from tests.conftest_browser import SIM_KEY, eventually, running_bridge
from tests.receiver import Receiver

INTERVAL = 0.1  # 3 intervals: 0.3 s
SLOW = 0.6  # seconds the upstream takes to answer: longer than 3 poll intervals
TIMEOUT = 2.0  # the source's timeout


@pytest.mark.parametrize(
    ("last_ok", "polling_since", "failing", "ready", "says"),
    [
        (99.0, None, False, True, "ok (last poll 1.0s ago)"),
        (90.0, None, False, False, "no successful poll for 10.0s (limit 3s)"),
        (None, None, False, False, "no successful poll yet"),
        (None, 95.0, False, True, "ok (first poll in progress for 5.0s)"),
        (None, 86.0, False, False, "first poll in progress for 14.0s (limit 13s)"),
        (80.0, 90.0, False, True, "ok (a poll in progress for 10.0s)"),
        (80.0, 86.9, False, False, "a poll in progress for 13.1s (limit 13s)"),
        # A poll after a failed one gets no grace: every poll may be hanging until its timeout.
        (90.0, 99.0, True, False, "no successful poll for 10.0s (limit 3s)"),
        (None, 99.0, True, False, "no successful poll yet"),
        (99.5, 99.9, True, True, "ok (last poll 0.5s ago)"),
    ],
    ids=[
        "fresh",
        "stale",
        "never",
        "first-poll-running",
        "first-poll-hangs",
        "long-poll-running",
        "long-poll-hangs",
        "after-a-failure",
        "first-after-a-failure",
        "fresh-though-failing",
    ],
)
def test_readiness_counts_a_poll_in_progress_until_the_timeout(
    last_ok: float | None, polling_since: float | None, failing: bool, ready: bool, says: str
) -> None:
    status = SourceStatus("mj", last_ok=last_ok, polling_since=polling_since)
    got = readiness(status, failing=failing, now=100.0, interval=1.0, timeout=10.0)
    assert got == (ready, says)


@pytest.fixture
async def slow_sim() -> AsyncIterator[Simulator]:
    """An upstream that takes SLOW seconds over every /mj/task/* answer."""
    async with Simulator(api_key=SIM_KEY) as sim:
        sim.seed_tasks(50)
        sim.fault, sim.hang_seconds = "timeout", SLOW
        yield sim


def config(sim: Simulator, rx: Receiver) -> Config:
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
                    "timeout": f"{TIMEOUT:g}s",
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

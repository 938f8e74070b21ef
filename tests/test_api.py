"""The JSON API of a real running bridge: what an operator's script reads (events with filters and
cursor pages, one event, one task, dead letters), behind server.auth, and schemathesis against
the bridge's own /api/openapi.json (every answer matches the document, no input makes a 500)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.config import load_config
from bridge.simulator import Simulator
from tests import pg
from tests.conftest_browser import SIM_KEY, Harness, advance, eventually, running_bridge
from tests.receiver import Receiver, Reply

TOKEN = "api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RULES = """
sources:
  - name: mj
    base_url: {sim}
    api_key: {key}
    auth: mj-api-secret
    poll_interval: 100ms
targets:
  hook:
    webhook: {rx}/hook
  gone:
    webhook: {refusing}/hook?token=GONESECRET
rules:
  - name: all
    on: "task.*"
    to: [hook]
  - name: finished
    on: [task.succeeded]
    to: [gone]
server:
  listen: 127.0.0.1:0
  auth:
    token: {token}
"""


@pytest.fixture(params=["sqlite", "postgres"])
async def api(
    request: pytest.FixtureRequest, rx: Receiver, tmp_path: Path
) -> AsyncIterator[tuple[Harness, Simulator, aiohttp.ClientSession]]:
    async with (
        Simulator("midjourney-proxy", api_key=SIM_KEY) as sim,
        Receiver(Reply(410, b"gone for good")) as refusing,
    ):
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            RULES.format(sim=sim.url, key=SIM_KEY, rx=rx.url, refusing=refusing.url, token=TOKEN)
        )
        if request.param == "sqlite":
            db_cm: Any = _path(str(tmp_path / "b.db"))
        else:
            db_cm = pg.database()
        async with (
            db_cm as db,
            running_bridge(load_config(str(rules)), db) as harness,
            aiohttp.ClientSession(base_url=harness.url, headers=AUTH) as http,
        ):
            for prompt in ("first cat", "second cat", "third cat"):
                sim.add_task(prompt, steps=1)
            await advance(harness, sim, 4)
            await eventually(lambda: harness.running.deliverer.counts[("gone", "dead")] >= 3, 30)
            yield harness, sim, http


class _path:
    def __init__(self, path: str) -> None:
        self.path = path

    async def __aenter__(self) -> str:
        return self.path

    async def __aexit__(self, *exc: object) -> None:
        return None


async def get(http: aiohttp.ClientSession, path: str, **params: Any) -> tuple[int, Any]:
    async with http.get(path, params=params) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def test_the_api_reads_events_tasks_and_dead_letters(
    api: tuple[Harness, Simulator, aiohttp.ClientSession],
) -> None:
    harness, _, http = api
    async with aiohttp.ClientSession(base_url=harness.url) as anonymous:
        for path in ("/api/events", "/api/dead-letters", "/api/openapi.json", "/api/nothing"):
            async with anonymous.get(path) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")

    status, body = await get(http, "/api/events", limit="1000")
    assert status == 200
    everything = body["events"]
    assert body["next"] is None
    assert len(everything) >= 9  # submitted, started, succeeded for each of three tasks
    assert [e["time"] for e in everything] == sorted((e["time"] for e in everything), reverse=True)

    # Cursor pages of 2 walk the same list once.
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, body = await get(http, "/api/events", **params)
        assert status == 200
        seen += [e["id"] for e in body["events"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in everything]

    status, body = await get(http, "/api/events", type="task.succeeded", source="mj")
    succeeded = body["events"]
    assert {e["type"] for e in succeeded} == {"task.succeeded"}
    assert len(succeeded) == 3
    oldest = min(e["time"] for e in everything)
    _, body = await get(http, "/api/events", type="task.*", until=oldest)
    assert body["events"] == []
    _, body = await get(http, "/api/events", since=oldest, type="task.started")
    assert len(body["events"]) == 3
    _, body = await get(http, "/api/events", q="SECOND cat", type="task.succeeded")
    [found] = body["events"]
    assert found["data"]["task"]["prompt"] == "second cat"
    _, body = await get(http, "/api/events", q="100% and_")  # % and _ are only characters
    assert body["events"] == []

    event = succeeded[0]
    status, body = await get(http, f"/api/events/{event['id']}")
    assert status == 200
    assert body["event"] == event
    states = {d["target"]: d["state"] for d in body["deliveries"]}
    assert states == {"hook": "sent", "gone": "dead"}

    status, body = await get(http, f"/api/tasks/mj/{event['subject']}")
    assert status == 200
    assert body["state"]["status"] == "SUCCESS"
    assert body["state"]["finished"] is True
    assert body["events"][0]["type"] == "task.submitted"
    assert body["events"][-1]["id"] == event["id"]
    assert {d["target"] for d in body["deliveries"]} == {"hook", "gone"}

    status, body = await get(http, "/api/dead-letters", target="gone", limit="2")
    assert status == 200
    assert len(body["dead_letters"]) == 2
    assert body["next"]
    first = body["dead_letters"]
    _, body = await get(http, "/api/dead-letters", target="gone", cursor=body["next"])
    assert len(body["dead_letters"]) == 1
    letters = first + body["dead_letters"]
    assert len({d["id"] for d in letters}) == 3
    for letter in letters:
        assert letter["state"] == "dead"
        assert letter["event"]["type"] == "task.succeeded"
        assert "GONESECRET" not in str(letter)
    _, body = await get(http, "/api/dead-letters", target="hook")
    assert body == {"dead_letters": [], "next": None}

    for path, params in (
        ("/api/events", {"cursor": "nope"}),
        ("/api/events", {"cursor": "1796104429.5_evt"}),
        ("/api/events", {"limit": "0"}),
        ("/api/events", {"since": "yesterday"}),
        ("/api/dead-letters", {"cursor": "x"}),
    ):
        status, body = await get(http, path, **params)
        assert status == 400, (path, params)
        assert body["error"]
    for limit in ("-1", "0", "100000", "ten"):
        status, body = await get(http, "/api/events", limit=limit)
        assert status == 400
        assert body["error"] == "limit must be a whole number from 1 to 1000"
    assert (await get(http, "/api/events/evt_nope"))[0] == 404
    assert (await get(http, "/api/tasks/mj/nope"))[0] == 404
    assert (await get(http, "/api/events/"))[0] == 404


@pytest.mark.parametrize("api", ["sqlite", "postgres"], indirect=True)
async def test_schemathesis_finds_nothing_against_the_openapi_document(
    api: tuple[Harness, Simulator, aiohttp.ClientSession], tmp_path: Path
) -> None:
    harness, _, _ = api
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{harness.url}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--max-examples",
        "40",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--no-color",
        "--suppress-health-check",
        "too_slow",
    ]
    result = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "5 operations" in report or "passed" in report.lower(), report

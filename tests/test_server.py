"""The HTTP server of a real running bridge: push callbacks, health, readiness, metrics; and a
clean stop of `python -m bridge run` on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from bridge.config import Listen
from bridge.server.push import MAX_BODY
from bridge.simulator import Simulator
from tests.conftest_browser import (
    PUSH_TOKEN,
    SIM_KEY,
    Harness,
    eventually,
    make_config,
    running_bridge,
)
from tests.receiver import Receiver


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def bridge(sim: Simulator, rx: Receiver, tmp_path: Path) -> AsyncIterator[Harness]:
    """Polls every 30 s: within a test only push (or an explicit poll) can explain a change.
    A second source `quiet` has no push_token."""
    quiet = {
        "name": "quiet",
        "base_url": sim.url,
        "api_key": SIM_KEY,
        "auth": "mj-api-secret",
        "poll_interval": "30s",
    }
    config = make_config(sim.url, rx.url, extra_sources=[quiet])
    async with running_bridge(config, tmp_path / "b.db") as harness:
        yield harness


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes | io.BytesIO | AsyncIterator[bytes],
    token: str | None = PUSH_TOKEN,
) -> tuple[int, dict[str, object]]:
    params = {"token": token} if token is not None else {}
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=body, params=params, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


def events_of(rx: Receiver) -> list[tuple[str, str]]:
    return [(r.json()["type"], r.json()["subject"]) for r in rx.requests]


async def test_push_reaches_the_target_before_the_next_poll_and_is_reported_once(
    bridge: Harness, sim: Simulator, rx: Receiver, http: aiohttp.ClientSession
) -> None:
    task_id = sim.add_task("a cat in a hat")
    task = sim.task(task_id)
    status, answer = await post(http, f"{bridge.url}/hooks/mj", orjson.dumps(task))
    assert (status, answer) == (200, {"accepted": 1, "events": ["task.submitted"]})
    await rx.wait_for(1)
    assert events_of(rx) == [("task.submitted", task_id)]

    # The simulator itself posts notifyHook callbacks (SUBMITTED, then IN_PROGRESS).
    sim.notify_hook = f"{bridge.url}/hooks/mj?token={PUSH_TOKEN}"
    sim.tick(2)
    await asyncio.wait_for(sim.flush(), 10)
    await rx.wait_for(2)
    assert events_of(rx) == [("task.submitted", task_id), ("task.started", task_id)]
    assert all(code == 200 for _, _, code in sim.notifications)

    # The same change seen by a poll emits nothing more.
    assert await bridge.running.watchers["mj"].poll_once() == []
    # ...and pushing it again neither.
    status, answer = await post(http, f"{bridge.url}/hooks/mj", orjson.dumps([sim.task(task_id)]))
    assert (status, answer) == (200, {"accepted": 1, "events": []})
    await asyncio.sleep(0.1)
    assert len(rx.requests) == 2


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/hooks/mj", "wrong", 401),
        ("/hooks/mj", None, 401),
        ("/hooks/mj", "", 401),
        ("/hooks/nope", PUSH_TOKEN, 404),
        ("/hooks/quiet", PUSH_TOKEN, 404),
    ],
    ids=["wrong-token", "no-token", "empty-token", "unknown-source", "push-not-enabled"],
)
async def test_push_refused(
    bridge: Harness,
    sim: Simulator,
    rx: Receiver,
    http: aiohttp.ClientSession,
    path: str,
    token: str | None,
    status: int,
) -> None:
    task = sim.task(sim.add_task("a dog"))
    got, answer = await post(http, bridge.url + path, orjson.dumps(task), token)
    assert got == status
    assert "error" in answer
    assert bridge.running.watchers["mj"].states == {}
    assert await bridge.running.store.recent_events() == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_push_body_over_a_megabyte_is_refused(
    bridge: Harness, http: aiohttp.ClientSession, chunked: bool
) -> None:
    body = b'{"id": "1", "status": "SUCCESS", "prompt": "' + b"x" * MAX_BODY + b'"}'

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    data = pieces() if chunked else io.BytesIO(body)
    status, answer = await post(http, f"{bridge.url}/hooks/mj", data)
    assert status == 413
    assert "error" in answer
    assert await bridge.running.store.recent_events() == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty body"),
        (b'{"id": "1", "status": ', "not valid JSON"),
        (b'"SUCCESS"', "expected a task object"),
        (b"[]", "non-empty JSON array"),
        (b'[{"id": "1", "status": "SUCCESS"}, 7]', "item 1 is not a JSON object"),
        (b'{"status": "SUCCESS", "prompt": "no id"}', "task 0: no id"),
        (b'[{"id": "2", "status": "SUCCESS"}, {"id": true}]', "task 1: id is a JSON boolean"),
        (b'{"id": "nope"}', "task 0: neither a known status"),
        (b'{"id": "3", "status": "DONE?"}', "task 0: neither a known status"),
        (b'[{"id": "4", "status": "SUCCESS"}, {"id": "5", "status": ""}]', "task 1: neither"),
    ],
    ids=[
        "empty",
        "truncated",
        "string",
        "empty-array",
        "not-an-object",
        "no-id",
        "bad-id",
        "id-only",
        "unknown-status",
        "one-of-two-unrecognisable",
    ],
)
async def test_malformed_push_is_refused_and_changes_nothing(
    bridge: Harness, rx: Receiver, http: aiohttp.ClientSession, body: bytes, reason: str
) -> None:
    status, answer = await post(http, f"{bridge.url}/hooks/mj", body)
    assert status == 400
    assert reason in str(answer["error"])
    assert bridge.running.watchers["mj"].states == {}
    assert await bridge.running.store.recent_events() == []
    assert rx.requests == []


async def test_healthz_and_metrics(
    bridge: Harness, sim: Simulator, rx: Receiver, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{bridge.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok\n"

    task = sim.task(sim.add_task("metrics please"))
    status, _ = await post(http, f"{bridge.url}/hooks/mj", orjson.dumps(task))
    assert status == 200
    await rx.wait_for(1)
    await eventually(lambda: bridge.running.deliverer.counts[("hook", "sent")] >= 1)
    for _ in range(250):  # the deliverer records sends in batches
        if not await bridge.running.store.outbox_depth():
            break
        await asyncio.sleep(0.02)

    async with http.get(f"{bridge.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    lines = set(text.splitlines())
    assert 'bridge_events_total{source="mj",type="task.submitted"} 1.0' in lines or (
        'bridge_events_total{type="task.submitted",source="mj"} 1.0' in lines
    )
    assert 'bridge_outbox_depth{target="hook"} 0.0' in lines
    assert 'bridge_dead_letters{target="hook"} 0.0' in lines
    assert 'bridge_source_up{source="mj"} 1.0' in lines
    assert any(
        line.startswith('bridge_deliveries_total{outcome="sent"')
        or (line.startswith('bridge_deliveries_total{target="hook",outcome="sent"}'))
        for line in lines
    ), text
    assert any(line.startswith("bridge_poll_seconds_bucket") for line in lines), text


async def test_readyz_follows_the_sources(
    sim: Simulator, rx: Receiver, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = make_config(sim.url, rx.url, poll="50ms")
    async with running_bridge(config, tmp_path / "b.db") as harness:

        async def ready() -> tuple[int, dict[str, object]]:
            async with http.get(f"{harness.url}/readyz") as resp:
                return resp.status, orjson.loads(await resp.read())

        assert (await ready())[0] == 200
        sim.fault = "500"
        for _ in range(500):
            status, answer = await ready()
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert status == 503
        assert answer["ready"] is False
        assert "mj" in answer["sources"]  # type: ignore[operator]

        sim.fault = None
        for _ in range(1000):
            status, answer = await ready()
            if status == 200:
                break
            await asyncio.sleep(0.02)
        assert status == 200
        assert answer["ready"] is True
        assert str(answer["sources"]["mj"]).startswith("ok")  # type: ignore[index]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8787", ("127.0.0.1", 8787)),
        (":8787", (None, 8787)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9000", ("::1", 9000)),
    ],
    ids=["host", "any", "zero", "ipv6"],
)
def test_parse_listen(listen: str, expected: tuple[str | None, int]) -> None:
    parsed = Listen.parse(listen)
    assert (parsed.host, parsed.port) == expected


@pytest.mark.parametrize("listen", ["8787", "host:", "host:http", "h:70000"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        Listen.parse(listen)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_bridge_run_stops_cleanly_on_signal(
    sim: Simulator, rx: Receiver, tmp_path: Path, sig: signal.Signals
) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text(
        f"""
sources:
  - name: mj
    base_url: {sim.url}
    api_key: {SIM_KEY}
    auth: mj-api-secret
    poll_interval: 100ms
targets:
  hook:
    webhook: {rx.url}/hook
rules:
  - name: all
    on: ["task.*"]
    to: [hook]
server:
  listen: 127.0.0.1:0
"""
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "run",
        "-c",
        str(config),
        "--db",
        str(tmp_path / "b.db"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        # Polled twice: the signal handlers are in place and the loops run.
        await eventually(lambda: len(sim.requests) >= 2, within=20)
        proc.send_signal(sig)
        assert proc.stderr is not None
        async with asyncio.timeout(10):
            stderr = (await proc.stderr.read()).decode()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, stderr
    assert "stopped cleanly" in stderr
    assert "Traceback" not in stderr

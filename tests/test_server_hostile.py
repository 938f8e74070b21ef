"""The pass-through, push callbacks and the server's limits as a hostile peer meets them, against
a real listening bridge and the simulator: path tricks, callers without credentials, browsers of
other sites, oversized bodies and answers, forged and borrowed callbacks, slow and many
connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.models import Event
from bridge.simulator import Simulator
from tests.conftest_browser import eventually

KEY = "sim-key-456"
CLIENT_TOKEN = "client-token-0123456789"
PUSH_TOKEN = "push-token-0123456789"
AUTH = {"mj-api-secret": KEY}


def config(sim: Simulator, **server: Any) -> Config:
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": "mj",
                    "base_url": sim.url,
                    "api_key": KEY,
                    "auth": "mj-api-secret",
                    "poll_interval": "1h",  # only pushes and pass-through calls explain changes
                    "push_token": PUSH_TOKEN,
                }
            ],
            "server": {
                "listen": "127.0.0.1:0",
                "passthrough": {"tokens": [CLIENT_TOKEN]},
                **server,
            },
        }
    )


@contextlib.asynccontextmanager
async def running(cfg: Config, db: Path) -> AsyncIterator[tuple[Bridge, str, list[Event]]]:
    events: list[Event] = []
    bridge = Bridge(cfg, str(db), on_event=[events.append])
    task = asyncio.create_task(bridge.run())
    try:
        live = await asyncio.wait_for(bridge.wait_started(), 10)
        assert bridge.url is not None
        # The first poll (first contact: what exists is recorded silently) is behind us.
        await eventually(lambda: all(w.status.polls for w in live.watchers.values()))
        yield bridge, bridge.url, events
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator("midjourney-proxy", api_key=KEY) as s:
        yield s


@pytest.fixture
async def edge(sim: Simulator, tmp_path: Path) -> AsyncIterator[tuple[Bridge, str, list[Event]]]:
    async with running(config(sim), tmp_path / "b.db") as it:
        yield it


async def raw(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request written by hand (no client normalises its path); the status and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    if "Connection:" not in head:
        head += "Connection: close\n"
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


# -- the pass-through -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/mj/../_admin/secret",
        "/mj/%2e%2e/actuator/env",
        "/mj/..%2factuator/env",
        "/mj/task/%2E%2E%2F%2E%2E%2Factuator/fetch",
        "/mj/task/x%2fy/fetch",
        "/mj//task/list",
        "/mj/task/..\\..\\x/fetch",
        "/mj/actuator/env",
        "/mj/task/list/../../../actuator/env",
        "/mj-fast/../actuator/env",
        "/other/mj/task/list",
    ],
)
async def test_only_task_api_paths_reach_the_upstream(
    edge: tuple[Bridge, str, list[Event]], sim: Simulator, path: str
) -> None:
    _, url, _ = edge
    before = list(sim.requests)
    status, _ = await raw(url, f"GET {path} HTTP/1.1\nHost: 127.0.0.1\nmj-api-secret: {KEY}\n")
    assert status in (400, 404)
    assert sim.requests == before  # nothing reached the upstream
    # The documented path answers, with the same credentials.
    status, body = await raw(url, f"GET /mj/task/list HTTP/1.1\nHost: x\nmj-api-secret: {KEY}\n")
    assert status == 421  # ...and only under a name the server answers to
    status, body = await raw(
        url, f"GET /mj/task/list HTTP/1.1\nHost: 127.0.0.1\nmj-api-secret: {KEY}\n"
    )
    assert status == 200
    assert body.startswith(b"[")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"mj-api-secret": "wrong"}, 401),
        ({"Authorization": f"Bearer {KEY}"}, 401),  # the key, but not in the source's scheme
        ({"Authorization": "Bearer wrong-token-0123456789"}, 401),
        ({"mj-api-secret": KEY}, 200),
        ({"Authorization": f"Bearer {CLIENT_TOKEN}"}, 200),  # the bridge adds its own key
        ({"mj-api-secret": CLIENT_TOKEN}, 200),
    ],
    ids=["none", "wrong", "key-other-scheme", "wrong-token", "key", "token", "token-as-key"],
)
async def test_callers_without_credentials_get_nothing(
    edge: tuple[Bridge, str, list[Event]],
    sim: Simulator,
    headers: dict[str, str],
    status: int,
) -> None:
    bridge, url, _ = edge
    before = len(sim.requests)
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/mj/submit/imagine", json={"prompt": "x"}, headers=headers) as resp,
    ):
        assert resp.status == status
        if status == 401:
            assert len(sim.requests) == before  # the bridge never lent its key
            return
        tid = (await resp.json())["result"]
    assert bridge.running is not None
    assert tid in bridge.running.watchers["mj"].states


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("POST", {"Origin": "http://evil.example"}, 403),
        ("POST", {"Origin": "null"}, 403),
        ("POST", {"Sec-Fetch-Site": "cross-site"}, 403),
        ("POST", {"Sec-Fetch-Site": "same-site"}, 403),
        ("POST", {"Content-Type": "text/plain"}, 403),  # a "simple" cross-site form post
        ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, 403),
        ("OPTIONS", {"Origin": "http://evil.example"}, 405),
        ("OPTIONS", {}, 405),
    ],
    ids=["origin", "null-origin", "cross-site", "same-site", "text-plain", "form", "preflight",
         "options"],
)  # fmt: skip
async def test_browsers_of_other_sites_are_refused(
    edge: tuple[Bridge, str, list[Event]],
    sim: Simulator,
    method: str,
    headers: dict[str, str],
    status: int,
) -> None:
    _, url, _ = edge
    before = len(sim.requests)
    headers = {"Content-Type": "application/json", **AUTH, **headers}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url + "/mj/submit/imagine", data=b'{"prompt": "x"}', headers=headers
        ) as resp,
    ):
        assert resp.status == status
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert len(sim.requests) == before


async def test_bodies_and_answers_are_capped(sim: Simulator, tmp_path: Path) -> None:
    cfg = config(sim, passthrough={"max_body": "64KiB", "max_answer": "32KiB"})
    sim.seed_tasks(200)  # the task list is far over 32 KiB
    async with running(cfg, tmp_path / "b.db") as (_, url, _), aiohttp.ClientSession() as http:
        before = len(sim.requests)
        big = orjson.dumps({"prompt": "x" * 100_000})
        async with http.post(
            url + "/mj/submit/imagine",
            data=big,
            headers={**AUTH, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413

        async def endless() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            for _ in range(100):
                yield b'{"ids": [' + b'"1",' * 4000 + b'"2"]}'

        async with http.post(
            url + "/mj/task/list-by-condition",
            data=endless(),
            headers={**AUTH, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413
        assert len(sim.requests) - before <= 1  # a streamed body may have started upstream
        # An answer over the cap is not relayed (cut off mid-stream when it gave no length).
        async with http.get(url + "/mj/task/list", headers=AUTH) as resp:
            assert resp.status == 502
            assert "over 32768 bytes" in (await resp.json())["error"]
        # A small answer streams through whole.
        tid = sim.add_task("small")
        async with http.get(url + f"/mj/task/{tid}/fetch", headers=AUTH) as resp:
            assert (await resp.json())["id"] == tid


async def test_calls_beyond_the_concurrency_limit_wait_then_are_refused(
    sim: Simulator, tmp_path: Path
) -> None:
    cfg = config(sim, passthrough={"concurrency": 1}, header_timeout="500ms")
    sim.fault, sim.hang_seconds = "timeout", 3.0
    async with running(cfg, tmp_path / "b.db") as (_, url, _), aiohttp.ClientSession() as http:
        slow = asyncio.create_task(http.get(url + "/mj/task/list", headers=AUTH))
        await asyncio.sleep(0)
        await eventually(lambda: any(p == "/mj/task/list" for _, p in sim.requests))
        async with http.get(url + "/mj/task/queue", headers=AUTH) as resp:
            assert resp.status == 503
            assert "too many" in (await resp.json())["error"]
        (await slow).release()
        sim.fault = None
        async with http.get(url + "/mj/task/queue", headers=AUTH) as resp:
            assert resp.status == 200


# -- push callbacks -------------------------------------------------------------------------


async def submit(http: aiohttp.ClientSession, url: str, prompt: str, **extra: str) -> str:
    async with http.post(
        url + "/mj/submit/imagine", json={"prompt": prompt}, headers={**AUTH, **extra}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["result"])


async def test_a_tasks_hook_is_good_for_that_task_only(
    edge: tuple[Bridge, str, list[Event]], sim: Simulator
) -> None:
    _, url, events = edge
    async with aiohttp.ClientSession() as http:
        a = await submit(http, url, "task a")
        b = await submit(http, url, "task b")
        hook_a = (sim.task(a) or {})["properties"]["notifyHook"]
        hook_b = (sim.task(b) or {})["properties"]["notifyHook"]
        assert hook_a != hook_b
        for hook in (hook_a, hook_b):
            assert hook.startswith(url + "/hooks/mj?task=")
            assert PUSH_TOKEN not in hook
        # Whoever reads task a's notifyHook cannot push for task b...
        async with http.post(hook_a, data=orjson.dumps(sim.task(b))) as resp:
            assert resp.status == 403
        async with http.post(hook_a, data=orjson.dumps([sim.task(a), sim.task(b)])) as resp:
            assert resp.status == 403
        # ...nor forge task a's state: a push is a hint, the upstream's answer is what counts.
        forged = {**(sim.task(a) or {}), "status": "SUCCESS", "progress": "100%"}
        forged["imageUrl"] = "http://evil.example/x.png"
        async with http.post(hook_a, data=orjson.dumps(forged)) as resp:
            assert resp.status == 200
        assert not any(e.type == "task.succeeded" for e in events)
        # A made-up token or nonce opens nothing.
        wrong = hook_a.rsplit("token=", 1)[0] + "token=AAAA"
        async with http.post(wrong, data=orjson.dumps(sim.task(a))) as resp:
            assert resp.status == 401
        # The real upstream's own callbacks work.
        sim.tick(2)
        await asyncio.wait_for(sim.flush(), 10)
        assert [code for tid, _, code in sim.notifications if tid == a] == [200, 200]
        assert ("task.started", a) in [(e.type, e.subject) for e in events]


async def test_a_forged_push_with_the_source_token_changes_nothing(
    edge: tuple[Bridge, str, list[Event]], sim: Simulator
) -> None:
    _, url, events = edge
    tid = sim.add_task("real")
    sim.tick()  # SUBMITTED upstream
    forged = {"id": tid, "status": "FAILURE", "failReason": "<b>forged</b>", "progress": "0%"}
    hook = f"{url}/hooks/mj?token={PUSH_TOKEN}"
    async with aiohttp.ClientSession() as http:
        async with http.post(hook, data=orjson.dumps(forged)) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["accepted"] == 1
        assert [e.type for e in events] == ["task.submitted"]  # what the upstream says
        assert events[0].task is not None
        assert events[0].task.get("failReason") in (None, "")
        # An id the upstream does not know emits nothing at all.
        ghost = {"id": "999999", "status": "SUCCESS", "progress": "100%"}
        async with http.post(hook, data=orjson.dumps(ghost)) as resp:
            assert (resp.status, (await resp.json())["unknown"]) == (200, 1)
    assert len(events) == 1


async def test_the_hook_address_comes_from_config_never_from_host(
    sim: Simulator, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(sim, listen=f"127.0.0.1:{port}", public_url="https://bridge.example.net")
    async with running(cfg, tmp_path / "b.db") as (_, url, _), aiohttp.ClientSession() as http:
        assert url == "https://bridge.example.net"
        local = f"http://127.0.0.1:{port}"
        tid = await submit(http, local, "hosted")
        assert (sim.task(tid) or {})["properties"]["notifyHook"].startswith(
            "https://bridge.example.net/hooks/mj?task="
        )
        async with http.post(
            local + "/mj/submit/imagine",
            json={"prompt": "x"},
            headers={**AUTH, "Host": "attacker.example"},
        ) as resp:
            assert resp.status == 421
        assert not any("attacker" in str((sim.task(t) or {}).get("properties")) for t in [tid])


async def test_push_bodies_are_capped_and_read_in_time(sim: Simulator, tmp_path: Path) -> None:
    cfg = config(sim, body_timeout="1s")
    async with running(cfg, tmp_path / "b.db") as (_, url, _):
        head = (
            f"POST /hooks/mj?token={PUSH_TOKEN} HTTP/1.1\nHost: 127.0.0.1\n"
            "Content-Type: application/json\nContent-Length: 100\n"
        )
        status, _ = await raw(url, head, b'{"id": ')  # and then nothing more
        assert status == 408
        status, _ = await raw(
            url,
            head.replace("Content-Length: 100", "Content-Length: 2000000"),
        )
        assert status == 413


# -- slow and many connections --------------------------------------------------------------


async def test_slow_headers_are_cut_off(sim: Simulator, tmp_path: Path) -> None:
    """Twenty clients send one header line every 200 ms and never finish: each is closed by the
    server (header_timeout 1s) while it is still sending, and others are served meanwhile."""
    cfg = config(sim, header_timeout="1s")
    async with running(cfg, tmp_path / "b.db") as (_, url, _):
        host, port = url.removeprefix("http://").rsplit(":", 1)

        async def slowloris() -> int:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            lines = 0
            try:
                while lines < 150:  # 30 s of header lines at most
                    writer.write(f"X-Slow-{lines}: 1\r\n".encode())
                    await writer.drain()
                    lines += 1
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                            return lines  # closed by the server
            except (ConnectionError, OSError):
                return lines
            finally:
                writer.close()
            return -1

        clients = [asyncio.create_task(slowloris()) for _ in range(20)]
        async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
            assert resp.status == 200
        sent = await asyncio.gather(*clients)
        assert all(0 < n < 150 for n in sent), sent


async def test_connections_over_the_cap_get_503(sim: Simulator, tmp_path: Path) -> None:
    cfg = config(sim, max_connections=5)
    async with running(cfg, tmp_path / "b.db") as (_, url, _):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
        try:
            async with asyncio.timeout(10):
                while True:  # the server has taken all five
                    status, _ = await raw(url, "GET /healthz HTTP/1.1\nHost: 127.0.0.1\n")
                    if status == 503:
                        break
                    await asyncio.sleep(0.05)
        finally:
            for _, writer in held:
                writer.close()
        for _ in range(200):  # the server notices the closed connections
            if (await raw(url, "GET /healthz HTTP/1.1\nHost: 127.0.0.1\n"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server did not serve again once connections closed")

"""`bridge receive` as a real process, over HTTP: the targets' own paths judge signatures; any
other path is 404 Not Found and says nothing else, however the request was signed."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from bridge.targets.webhook import sign, signing_key
from tests.conftest import bridge

SECRET = "receive-test-secret"
RULES = f"""
targets:
  pipeline:
    webhook: http://127.0.0.1:9/pipeline
    secret: {SECRET}
  plain:
    webhook: http://127.0.0.1:9/plain
  team-chat: json://127.0.0.1:9/chat
"""


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    stamp = int(time.time())
    return {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(signing_key(secret), "evt_1", stamp, body),
        "content-type": "application/json",
    }


EVENT = orjson.dumps({"type": "task.succeeded", "source": "bridge/mj", "subject": "42"})


class Receive:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc, self.url = proc, url

    async def stop(self) -> str:
        """SIGTERM; everything it printed."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode == 0, err.decode()
        return out.decode()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receive]:
    config = tmp_path / "rules.yaml"
    config.write_text(RULES)
    proc = await bridge("receive", "-c", str(config), "--listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert first.startswith("receiving on http://"), first
        yield Receive(proc, first.split()[2].rstrip(";"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_unknown_path_is_404_and_says_nothing_more(
    receiver: Receive, session: aiohttp.ClientSession
) -> None:
    answers = []
    for method, path, headers in [
        ("POST", "/nowhere", {}),
        ("POST", "/nowhere", signed(EVENT)),  # signed with the right key: still not found
        ("POST", "/nowhere", signed(EVENT, "a guess")),
        ("GET", "/nowhere", {}),
        ("PUT", "/pipeline/", signed(EVENT)),
        ("DELETE", "/", {}),
        ("POST", "/%1b%5b2J%1b%5b31mclear", {}),  # escape sequences for the terminal
    ]:
        url = URL(receiver.url + path, encoded=True)
        async with session.request(method, url, data=EVENT, headers=headers) as r:
            answers.append((r.status, await r.read(), sorted(r.headers)))
    assert {status for status, _, _ in answers} == {404}
    assert {body for _, body, _ in answers} == {b"not found\n"}
    # The same headers whatever was asked: nothing tells a signed request from another.
    assert len({tuple(headers) for _, _, headers in answers}) == 1
    assert "Allow" not in answers[0][2]
    out = await receiver.stop()
    assert "received 0 verified events" in out
    assert "✗ POST /nowhere: no target of the config posts here (404)" in out
    assert "✗ GET /nowhere: no target of the config posts here (404)" in out
    assert "\x1b" not in out  # shown, not obeyed
    assert "✗ POST /\\x1b[2J\\x1b[31mclear: no target" in out


async def test_the_targets_paths_still_judge_signatures(
    receiver: Receive, session: aiohttp.ClientSession
) -> None:
    async def post(path: str, headers: dict[str, str]) -> tuple[int, str]:
        async with session.post(receiver.url + path, data=EVENT, headers=headers) as r:
            return r.status, await r.text()

    assert await post("/pipeline", {}) == (401, "signature does not verify\n")
    assert await post("/pipeline", signed(EVENT, "a guess")) == (401, "signature does not verify\n")
    assert await post("/plain", {}) == (401, "signature does not verify\n")  # no secret: no key
    assert (await post("/pipeline", signed(EVENT)))[0] == 204
    async with session.get(receiver.url + "/pipeline") as r:
        assert r.status == 405  # a real endpoint, asked the wrong way
    chat = orjson.dumps({"title": "3 tasks", "message": "done"})
    async with session.post(receiver.url + "/chat", data=chat) as r:
        assert r.status == 200
    out = await receiver.stop()
    assert "✓ pipeline: task.succeeded" in out
    assert "✉ team-chat: 3 tasks | done" in out
    assert "received 1 verified events, 1 chat messages" in out

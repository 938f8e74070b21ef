"""At least once across SIGKILL: a worker process commits and delivers N events to a receiver in
this process; it is killed in the middle of deliveries (twice), restarted, and every event must
arrive, every repeat under the same `webhook-id`."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import orjson
from standardwebhooks.webhooks import Webhook

from bridge.models import event_id
from bridge.store import Store
from tests.crash_worker import SECRET
from tests.receiver import Receiver, Reply

ROOT = Path(__file__).resolve().parent.parent
N = 200


async def start_worker(db: Path, url: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.crash_worker",
        str(db),
        url,
        str(N),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        assert await proc.stdout.readline() == b"started\n"
    return proc


async def kill_when(rx: Receiver, proc: asyncio.subprocess.Process, received: int) -> None:
    await rx.wait_for(received, within=30)
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    # killed in the middle: some events not delivered yet
    assert len({r.headers["webhook-id"] for r in rx.requests}) < N


async def test_sigkill_during_deliveries_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    async with Receiver(default=Reply(200, delay=0.01)) as rx:
        url = rx.url + "/hook"
        await kill_when(rx, await start_worker(db, url), N // 4)
        await kill_when(rx, await start_worker(db, url), N // 2)
        proc = await start_worker(db, url)
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            assert await proc.stdout.readline() == b"done\n"
            assert await proc.wait() == 0

    expected = {event_id("mj", n, "task.succeeded") for n in range(N)}
    verifier = Webhook(SECRET.encode())
    seen: set[str] = set()
    for req in rx.requests:
        body = verifier.verify(req.body, req.headers)
        # A repeat is the same event under the same id, never a new id for an old change.
        assert req.headers["webhook-id"] == body["id"]
        assert body == orjson.loads(req.body)
        seen.add(body["id"])
    assert seen == expected
    assert len(rx.requests) >= N

    async with await Store.open(str(db)) as store:
        assert await store.outbox_depth() == {}
        assert await store.dead_letters() == []

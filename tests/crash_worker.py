"""The process tests/test_crash.py kills: opens the store, commits N deliveries in snapshot-sized
transactions while a Deliverer sends them to a webhook, and exits 0 once the outbox is empty.

    python -m tests.crash_worker DB_PATH WEBHOOK_URL N
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from bridge.config import WebhookTargetConfig
from bridge.deliver import Deliverer
from bridge.diff import TaskState
from bridge.store import Store
from bridge.targets import build_target
from tests.receiver import make_delivery, make_event

SECRET = "crash-test-secret"
CHUNK = 25


async def main(path: str, url: str, count: int) -> None:
    config = WebhookTargetConfig(webhook=url, secret=SECRET, concurrency=4, timeout=5.0)
    async with await Store.open(path) as store, aiohttp.ClientSession() as session:
        deliverer = Deliverer(
            store, {"hook": build_target("hook", config, session)}, {"hook": config}, idle=0.2
        )
        runner = asyncio.create_task(deliverer.run())
        print("started", flush=True)
        # The same N changes every run: after a restart they are re-detected, and the store must
        # keep only what it did not have yet.
        for start in range(0, count, CHUNK):
            numbers = range(start, min(count, start + CHUNK))
            events = [make_event(n) for n in numbers]
            states = {str(n): TaskState("SUCCESS", 100, 1.0, finished=True) for n in numbers}
            await store.commit("mj", states, events, [make_delivery(e, "hook") for e in events])
            deliverer.wake()
            await asyncio.sleep(0.01)
        while await store.outbox_depth():  # noqa: ASYNC110 (the state lives in SQLite)
            await asyncio.sleep(0.02)
        await deliverer.drain(5.0)
        await runner
        print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

"""Upstream junk never invents task events: rows without a usable id (`{"foo":1}`, `{"id":null}`)
served by every reading endpoint, in every way of reading, through a proxy in front of the
simulator. No task.vanished while junk is served, no mode chosen from a junk answer, and the
task's real ending once the upstream recovers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.config import Config
from bridge.models import UNFINISHED, Event
from bridge.publish import Publisher
from bridge.rules import Router
from bridge.simulator import Simulator
from bridge.sources.poll import TaskAPI
from bridge.store import Store
from bridge.watch import Watcher
from tests.test_modes import Clock

KEY = "sk-junk-4242"
AUTH = {"midjourney-proxy": "mj-api-secret", "nz": "mj-api-secret", "trueai": "raw"}
JUNK = [{"foo": 1}, {"id": None}]
READING = ("/mj/task/list", "/mj/task/list-by-condition", "/mj/task/queue", "/mj/task/query")

Rewrite = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


class Proxy:
    """Forwards every request to the upstream, unless `rewrite` answers it first."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rewrite: Rewrite | None = None
        self.url = ""
        self._client: aiohttp.ClientSession | None = None

    async def forward(self, request: web.Request) -> tuple[int, str, bytes]:
        assert self._client is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._client.request(
            request.method,
            self.upstream + request.path_qs,
            data=await request.read(),
            headers=headers,
        ) as answer:
            return answer.status, answer.content_type, await answer.read()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.rewrite is not None:
            rewritten = await self.rewrite(request)
            if rewritten is not None:
                return rewritten
        status, content_type, body = await self.forward(request)
        return web.Response(status=status, body=body, content_type=content_type)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Proxy]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        async with aiohttp.ClientSession() as client:
            self._client = client
            try:
                await site.start()
                self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                yield self
            finally:
                await runner.cleanup()


class Junk:
    """What the proxy serves on the reading endpoints: None (the truth), "all" (junk rows only)
    or "some" (the real rows with the unfinished ones' ids gone, one good finished row, junk)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.kind: str | None = None
        self.good: dict[str, Any] = {}  # a finished task, so that "some" answers are never all junk
        proxy.rewrite = self

    def spoil(self, rows: list[Any]) -> list[Any]:
        spoiled = [
            {**row, "id": None}
            if isinstance(row, dict) and row.get("status") in UNFINISHED
            else row
            for row in rows
        ]
        return [*spoiled, self.good, *JUNK]

    async def __call__(self, request: web.Request) -> web.StreamResponse | None:
        if self.kind is None or request.path not in READING:
            return None
        if self.kind == "all":
            rows: Any = JUNK
            if request.path.endswith("/query"):
                rows = {"content": JUNK, "last": True, "number": 0, "numberOfElements": 2}
            return web.json_response(rows)
        status, content_type, body = await self.proxy.forward(request)
        if status != 200 or content_type != "application/json":
            return web.Response(status=status, body=body, content_type=content_type)
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            data["content"] = self.spoil(data["content"])
        elif isinstance(data, list):
            data = self.spoil(data)
        return web.Response(body=orjson.dumps(data), content_type="application/json")


@dataclass
class Rig:
    sim: Simulator
    proxy: Proxy
    junk: Junk
    watcher: Watcher
    clock: Clock
    events: list[Event] = field(default_factory=list)

    async def poll(self) -> list[str]:
        before = len(self.events)
        self.clock.now += 1
        await self.watcher.poll_once()
        return [e.type for e in self.events[before:]]

    def types(self, subject: str) -> list[str]:
        return [e.type for e in self.events if e.subject == subject]


@asynccontextmanager
async def rig(tmp_path: Path, flavor: str, **source: Any) -> AsyncIterator[Rig]:
    async with (
        Simulator(flavor, api_key=KEY) as sim,
        Proxy(sim.url).running() as proxy,
        aiohttp.ClientSession() as session,
    ):
        sim.seed_tasks(5)
        done = sim.add_task("finished before the bridge came", outcome="success", steps=1)
        sim.tick(5)
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": proxy.url,
                        "api_key": KEY,
                        "auth": AUTH.get(flavor, "bearer"),
                        "poll_interval": "50ms",
                        "timeout": "5s",
                        **source,
                    }
                ],
                "targets": {"hook": {"webhook": "http://127.0.0.1:9/unused"}},
                "rules": [],
            }
        )
        store = await Store.open(str(tmp_path / "b.db"))
        try:
            src = config.sources[0]
            events: list[Event] = []
            publisher = Publisher(store, Router(config), lambda: None, [events.append])
            clock = Clock()
            watcher = Watcher(src, TaskAPI(src, session), publisher, clock=clock)
            junk = Junk(proxy)
            junk.good = sim.task(done) or {}
            yield Rig(sim, proxy, junk, watcher, clock, events)
        finally:
            await store.close()


CASES = [
    ("midjourney-proxy", "auto", "active"),
    ("midjourney-proxy", "list", "list"),
    ("nz", "auto", "active"),
    ("trueai", "auto", "list"),
    ("trueai", "active", "active"),
    ("new-api", "auto", "ids"),
]


@pytest.mark.parametrize(("flavor", "mode", "reads"), CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
async def test_junk_never_vanishes_a_task_and_its_real_ending_arrives(
    tmp_path: Path, flavor: str, mode: str, reads: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bridge")
    async with rig(tmp_path, flavor, mode=mode) as r:
        await r.poll()  # first contact: the seeded tasks are recorded silently
        tid = r.sim.add_task("a fox under junk", outcome="success", steps=12)
        if flavor == "new-api":
            await r.watcher.track([tid])
        r.sim.tick(2)
        await r.poll()
        assert r.types(tid)[-1] in ("task.submitted", "task.started")
        assert r.watcher.status.mode == reads

        seen: list[str] = []
        for kind in ("all", "some", "all"):
            r.junk.kind = kind
            for _ in range(5):
                seen += await r.poll()
                r.sim.tick()
        assert "task.vanished" not in seen
        assert "source.down" in seen  # junk only is a failed poll: it counts toward source.down
        assert r.watcher.status.up is False
        # The probe after source.down saw only junk: no way of reading was chosen from it.
        assert r.watcher.reader is None or r.watcher.status.mode == reads

        r.junk.kind = None
        r.sim.tick(20)
        for _ in range(3):
            seen += await r.poll()
        assert "task.vanished" not in seen
        assert "source.up" in seen
        assert r.types(tid)[-1] == "task.succeeded"
        assert r.types(tid).count("task.succeeded") == 1
        assert r.watcher.status.mode == reads  # the probe after recovery chose as it would
        assert KEY not in caplog.text


async def test_some_junk_is_used_logged_once_per_poll_and_concludes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bridge")
    async with rig(tmp_path, "trueai") as r:
        await r.poll()
        tid = r.sim.add_task("hidden behind a null id", outcome="success", steps=12)
        r.sim.tick(2)
        await r.poll()
        r.junk.kind = "some"
        newer = r.sim.add_task("a new task while junk is served", outcome="success", steps=1)
        r.sim.tick(5)
        caplog.clear()
        emitted = [await r.poll() for _ in range(4)]
        # The list is used (the finished new task is seen), the unusable rows are not "missing".
        assert "task.succeeded" in r.types(newer)
        assert all("task.vanished" not in types for types in emitted)
        assert r.watcher.status.up
        lines = [rec for rec in caplog.records if "unusable task row(s)" in rec.getMessage()]
        assert len(lines) == 4  # one warning line per poll, however many requests met junk
        message = lines[0].getMessage()
        # The running task's row, {"foo": 1} and {"id": null}, in the list and in its lookup.
        assert "6 unusable task row(s) (no id: 6)" in message
        assert "/mj/task/list, POST" in message  # two requests met junk: still one line
        assert "no task is concluded missing" in message
        assert KEY not in caplog.text
        r.junk.kind = None
        r.sim.tick(20)
        await r.poll()
        assert r.types(tid)[-1] == "task.succeeded"
        assert "task.vanished" not in r.types(tid)


@pytest.mark.parametrize("flavor", ["midjourney-proxy", "nz", "trueai", "new-api"])
@pytest.mark.parametrize("kind", ["all", "some"])
async def test_the_probe_takes_no_junk_answer_for_a_working_endpoint(
    tmp_path: Path, flavor: str, kind: str
) -> None:
    async with rig(tmp_path, flavor) as r:
        r.sim.add_task("running", steps=20)
        r.sim.tick(2)
        r.junk.kind = kind
        for _ in range(3):
            await r.poll()
            assert r.watcher.reader is None
            assert r.watcher.status.last_error is not None
            assert r.watcher.status.last_error.startswith("bad_payload")
        assert "source.down" in [e.type for e in r.events]
        r.junk.kind = None
        assert "source.up" in await r.poll()
        assert r.watcher.status.mode == {"trueai": "list", "new-api": "ids"}.get(flavor, "active")

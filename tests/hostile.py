"""A hostile upstream for tests: a real local HTTP server that serves the task API's reading
endpoints with whatever rows a test sets (junk included), or an answer that never ends.

    async with HostileUpstream() as up:
        up.rows = [{"id": "1", "status": "SUCCESS", "progress": "Infinity%"}]
        up.endless = True        # GET /mj/task/list streams JSON-looking bytes forever
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
from aiohttp import web

from tests.local import LocalServer

CHUNK = b'{"id": "x", "status": "IN_PROGRESS", "progress": "5%"},' * 1024  # ~55 KiB


class HostileUpstream(LocalServer):
    """GET /mj/task/list serves `rows` (or `raw` bytes, or an endless stream); POST
    /mj/task/list-by-condition the rows with the ids asked for. `lists` counts list requests;
    `streamed` counts the bytes sent by endless answers."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.raw: bytes | None = None
        self.endless = False
        self.lists = 0
        self.streamed = 0
        self._polled = asyncio.Condition()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/mj/task/list", self._list)
        app.router.add_post("/mj/task/list-by-condition", self._by_ids)
        return app

    async def wait_lists(self, count: int, within: float = 30.0) -> None:
        """Until the bridge has asked for the list `count` times in all."""
        async with asyncio.timeout(within), self._polled:
            await self._polled.wait_for(lambda: self.lists >= count)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        async with self._polled:
            self.lists += 1
            self._polled.notify_all()
        if self.endless:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b"[")
            try:
                while True:
                    await response.write(CHUNK)
                    self.streamed += len(CHUNK)
            except (ConnectionError, RuntimeError):
                return response  # the reader hung up: what a bounded reader does
        # json, not orjson: orjson refuses to encode what a hostile upstream sends (300 levels).
        body = self.raw if self.raw is not None else json.dumps(self.rows).encode()
        return web.Response(body=body, content_type="application/json")

    async def _by_ids(self, request: web.Request) -> web.StreamResponse:
        asked = orjson.loads(await request.read()).get("ids") or []
        wanted = set(asked)
        rows = [r for r in self.rows if isinstance(r, dict) and r.get("id") in wanted]
        return web.Response(body=json.dumps(rows).encode(), content_type="application/json")


def deep(levels: int) -> dict[str, Any]:
    """An object nested `levels` deep: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


class EndlessTarget(LocalServer):
    """A target whose every answer (with `status`) streams bytes until the client hangs up."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        response = web.StreamResponse(status=self.status)
        response.content_type = "application/json"
        await response.prepare(request)
        try:
            while True:
                await response.write(CHUNK)
        except (ConnectionError, RuntimeError):
            return response

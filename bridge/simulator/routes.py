"""The simulator's HTTP face: routes per flavour, the auth check, fault injection, and the
`/mj/task/*` handlers answering exactly as each upstream does (`/mj/submit/*`: submit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import responses as r
from .lifecycle import SimTask
from .picture import picture
from .render import task_bytes
from .submit import Submit

if TYPE_CHECKING:
    from .app import Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STREAM_BATCH = 2000
QUEUED = ("NOT_START", "SUBMITTED", "IN_PROGRESS")
AUTH_PREFIXES = ("/mj/task/", "/mj/submit/", "/mj/insight-face/", "/mj/account/")
# 1x1 transparent PNG: what new-api's /mj/image/{id} proxy hands back in the simulator.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000000500010d0a2db40000000049454e44ae426082"
)


class Api:
    """The handlers of one Simulator; they read and drive its tasks."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        flavor = self.sim.flavor
        plus, nz, ta, new_api = (
            flavor == f for f in ("midjourney-proxy", "nz", "trueai", "new-api")
        )
        add = app.router.add_route

        def json(handler: r.ObjectHandler) -> Handler:
            return r.with_object(flavor, handler)

        if not new_api:
            add("GET", "/mj/task/list", self._list)
        add("POST", "/mj/task/list-by-condition", json(self._list_by_condition))
        if ta:
            add("POST", "/mj/task/list-by-ids", json(self._list_by_condition))
        add("GET", "/mj/task/{id}/fetch", self._fetch)
        if plus or nz:
            add("GET", "/mj/task/queue", self._queue)
        if plus:
            add("POST", "/mj/task/query", json(self._query))
        # nz 2.x serves no cancel and no image-seed: Spring's default 404 answers them.
        if not nz:
            add("GET", "/mj/task/{id}/image-seed", self._image_seed)
        if not (new_api or nz):
            add("POST", "/mj/task/{id}/cancel", self._cancel)
        if new_api:
            add("GET", "/mj/image/{id}", self._image)
        # The images the tasks' imageUrls point at (Discord's CDN path shape), for attach_image.
        add("GET", "/attachments/{tail:.+}", self._attachment)
        for path, handler in Submit(self.sim).routes():
            add("POST", path, json(handler))
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.sim.requests.append((request.method, request.path))
        response = await self._dispatch(request, handler)
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            self.sim.bytes_sent += len(response.body)
        return response

    async def _dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = self.sim.fault
        if fault and request.path.startswith("/mj/task/"):
            canned = r.canned_fault(fault, self.sim.flavor, request.path)
            if canned is not None:
                return canned
            if fault == "timeout":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.sim._closing.wait(), self.sim.hang_seconds)
            response = await self._answer(request, handler)
            if isinstance(response, web.Response):
                return r.transform(fault, response)
            return response
        return await self._answer(request, handler)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        matched = request.match_info.http_exception is None
        # new-api and Spring route before authenticating; trueai's middleware checks auth first.
        if not matched and self.sim.flavor != "trueai":
            return r.not_found(self.sim.flavor, request.path)
        if request.path.startswith(AUTH_PREFIXES) and not self._authorized(request):
            return r.unauthorized(self.sim.flavor)
        if not matched:
            return r.not_found(self.sim.flavor, request.path)
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        if self.sim.api_key is None:
            return True
        headers = request.headers
        expected = self.sim.api_key
        match self.sim.flavor:
            case "trueai":
                given = headers.get("Authorization") or headers.get("Mj-Api-Secret") or ""
            case "new-api":
                given = headers.get("Authorization", "")
                if given in ("", "midjourney-proxy"):
                    given = headers.get("mj-api-secret", "")
                given = given.removeprefix("Bearer ").removeprefix("sk-")
                expected = expected.removeprefix("sk-")
            case _:
                given = headers.get("mj-api-secret", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def _base(self, request: web.Request) -> str:
        return self.sim.url or f"{request.scheme}://{request.host}"

    # /mj/task/* -----------------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.StreamResponse:
        cap = self.sim.list_cap
        ordered = self.sim._ordered()
        pieces = self.sim._pieces(ordered if cap is None else ordered[:cap])
        if len(pieces) <= STREAM_BATCH or self.sim.fault:
            return r.raw_json(b"[" + b",".join(pieces) + b"]")
        # A 100k-task list is ~200 MB: stream it in batches of cached task bytes rather than
        # building one body (each fresh 200 MB buffer costs more in page faults than the join).
        length = sum(map(len, pieces)) + len(pieces) + 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = length
        await response.prepare(request)
        for start in range(0, len(pieces), STREAM_BATCH):
            chunk = b",".join(pieces[start : start + STREAM_BATCH])
            first, last = start == 0, start + STREAM_BATCH >= len(pieces)
            await response.write((b"[" if first else b",") + chunk + (b"]" if last else b""))
        await response.write_eof()
        self.sim.bytes_sent += length
        return response

    async def _list_by_condition(self, data: dict[str, Any], request: web.Request) -> web.Response:
        ids = data.get("ids")
        if not isinstance(ids, list) or not ids:
            return r.raw_json(b"[]")
        wanted = [
            i.strip() if self.sim.flavor == "trueai" else i for i in ids if isinstance(i, str)
        ]
        found = list({i: self.sim._tasks[i] for i in wanted if i in self.sim._tasks}.values())
        if self.sim.flavor in ("midjourney-proxy", "nz"):
            # NZ answers from the running queue first, then from the store.
            found = [t for t in found if t.status in QUEUED] + [
                t for t in found if t.status not in QUEUED
            ]
        return r.raw_json(self.sim._join(found))

    async def _fetch(self, request: web.Request) -> web.Response:
        task = self.sim._tasks.get(request.match_info["id"])
        if task is not None:
            return r.raw_json(self._task_body(task, request))
        match self.sim.flavor:
            case "trueai":
                return r.empty(204)
            case "new-api":
                body = {"description": "task_no_found", "type": "upstream_error", "code": 4}
                return r.json_response(body, 400)
        return r.empty(200)

    def _task_body(self, task: SimTask, request: web.Request) -> bytes:
        return task_bytes(
            task, self.sim.flavor, hook=self.sim._hook(task), base_url=self._base(request)
        )

    async def _queue(self, request: web.Request) -> web.Response:
        queued = sorted(
            (t for t in self.sim._unfinished.values() if t.status in QUEUED),
            key=lambda t: (t.submit_time, t.id),
        )
        return r.raw_json(self.sim._join(queued))

    async def _query(self, data: dict[str, Any], request: web.Request) -> web.Response:
        number = max(int(data.get("pageNumber") or 0), 0)
        size = max(int(data.get("pageSize") or 10), 1)
        rows = [t for t in self.sim._tasks.values() if _query_match(t, data)]
        field, _, direction = str(data.get("sort") or "id,desc").partition(",")
        key: Callable[[SimTask], Any] = (
            (lambda t: (t.submit_time, t.id)) if field == "submitTime" else (lambda t: t.id)
        )
        rows.sort(key=key, reverse=direction.lower() != "asc")
        content = rows[number * size : (number + 1) * size]
        total = len(rows)
        sort = {"empty": False, "sorted": True, "unsorted": False}
        rest = {
            "pageable": {
                "sort": sort,
                "offset": number * size,
                "pageNumber": number,
                "pageSize": size,
                "paged": True,
                "unpaged": False,
            },
            "last": (number + 1) * size >= total,
            "totalElements": total,
            "totalPages": math.ceil(total / size),
            "size": size,
            "number": number,
            "sort": sort,
            "first": number == 0,
            "numberOfElements": len(content),
            "empty": not content,
        }
        body = b'{"content":' + self.sim._join(content) + b"," + orjson.dumps(rest)[1:]
        return r.raw_json(body)

    async def _cancel(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        task = self.sim._tasks.get(task_id)
        cancelled = self.sim.cancel(task_id)
        if self.sim.flavor == "trueai":
            return r.empty(200)
        if task is None:
            return r.json_response({"code": 3, "description": "关联任务不存在或已失效"})
        if not cancelled:
            return r.json_response({"code": 4, "description": "关联任务状态错误"})
        return r.json_response({"code": 1, "description": "成功"})

    async def _image_seed(self, request: web.Request) -> web.Response:
        task = self.sim._tasks.get(request.match_info["id"])
        ta = self.sim.flavor == "trueai"
        if task is None:
            if self.sim.flavor == "new-api":
                body = {"description": "task_no_found", "type": "upstream_error", "code": 4}
                return r.json_response(body, 400)
            return r.json_response(
                {"code": 3, "description": "关联任务不存在或已失效"}, 404 if ta else 200
            )
        if task.status != "SUCCESS":
            return r.json_response(
                {"code": 4, "description": "关联任务状态错误"}, 400 if ta else 200
            )
        seed: dict[str, Any] = {"code": 1, "description": "成功", "result": task.seed}
        if ta:
            seed["properties"] = {}
        return r.json_response(seed)

    async def _image(self, request: web.Request) -> web.Response:
        task = self.sim._tasks.get(request.match_info["id"])
        if task is None or task.image_url is None:
            return r.json_response({"error": "image_url_not_found"}, 404)
        return web.Response(body=PNG, content_type="image/png")

    async def _attachment(self, request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        # A PNG whatever the name says (.webp included): browsers sniff the bytes.
        return web.Response(body=picture(tail), content_type="image/png")


def _query_match(task: SimTask, query: dict[str, Any]) -> bool:
    """plus's /mj/task/query filters: exact id, ids, action, status, state; statusSet; and
    substrings of prompt and failReason."""
    status_set = query.get("statusSet")
    if status_set and task.status not in status_set:
        return False
    ids = query.get("ids")
    if ids and task.id not in ids:
        return False
    for key, value in (
        ("id", task.id),
        ("action", task.action),
        ("status", task.status),
        ("state", task.state),
    ):
        wanted = query.get(key)
        if wanted and wanted != value:
            return False
    for key, value in (("prompt", task.prompt), ("failReason", task.fail_reason or "")):
        wanted = query.get(key)
        if wanted and str(wanted) not in value:
            return False
    return True

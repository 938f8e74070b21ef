"""How the bridge learns task ids a relay will not list (mode: ids): clients send their `/mj/...`
calls through the bridge, which forwards them unchanged with the caller's own auth and tracks the
id of every accepted submit; `POST /track/{source}` and `bridge track` add ids by hand.
Pipeline: (pass-through, /track) -> Watcher.track -> polls of those ids -> diff -> events.

Routing: with one source, `/mj/...` (and `/{anything}/mj/...`, e.g. trueai's `/mj-fast/mj/...`)
goes to it as is. With several, `/{source}/mj/...` or the header `X-Bridge-Source: NAME` picks one.
When the source has a push_token and the caller set no notifyHook of its own, a submit's
notifyHook is set to the bridge's `/hooks/{source}?token=...`, so an upstream that keeps it
pushes to the bridge (the public base is `BRIDGE_PUBLIC_URL`, else the request's own host).
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from bridge.config import Config, SourceConfig
from bridge.diff import TaskState
from bridge.errors import Redactor
from bridge.store import Store

if TYPE_CHECKING:
    from bridge.app import Bridge
    from bridge.watch import Watcher

__all__ = ["MAX_BODY", "MAX_IDS", "SOURCE_HEADER", "add_routes", "track_command"]

log = logging.getLogger("bridge.passthrough")

MAX_BODY = 64 * 1024 * 1024  # blend/describe/swap carry base64 images
MAX_IDS = 1000  # ids per POST /track
SOURCE_HEADER = "X-Bridge-Source"
ACCEPTED = (1, 21, 22)  # submitted, waiting for modal, queued: each has a task id in `result`
_HOP = frozenset(
    h.lower()
    for h in (
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Authenticate",
        "TE",
        "Trailer",
        "Upgrade",
        "Accept-Encoding",  # the session decompresses; the client gets plain bytes
        "Content-Encoding",
        SOURCE_HEADER,
    )
)
_BRIDGE_KEY: web.AppKey[Bridge] = web.AppKey("passthrough-bridge")


def add_routes(app: web.Application, bridge: Bridge) -> None:
    """Mount the pass-through (`/mj/...`, `/{prefix}/mj/...`) and `POST /track/{source}`."""
    app[_BRIDGE_KEY] = bridge
    app.router.add_post("/track/{source}", track)
    app.router.add_route("*", "/mj/{tail:.*}", forward)
    app.router.add_route("*", "/{prefix}/mj/{tail:.*}", forward)


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}), status=status, content_type="application/json"
    )


def _watchers(request: web.Request) -> dict[str, Watcher]:
    running = request.app[_BRIDGE_KEY].running
    if running is None:  # between two configurations during a reload
        raise web.HTTPServiceUnavailable(text="starting\n")
    return running.watchers


def _route(request: web.Request) -> tuple[Watcher, str] | web.Response:
    """The watcher a forwarded call belongs to and the upstream path, or the refusal."""
    watchers = _watchers(request)
    prefix = request.match_info.get("prefix")
    path = request.raw_path.split("?", 1)[0]
    if prefix is not None and prefix in watchers:
        return watchers[prefix], path[len(prefix) + 1 :]
    named = request.headers.get(SOURCE_HEADER)
    if named:
        if named not in watchers:
            return _error(404, f"unknown source in {SOURCE_HEADER}")
        return watchers[named], path
    if len(watchers) == 1:
        return next(iter(watchers.values())), path
    if not watchers:
        return _error(404, "no sources configured")
    return _error(
        400,
        f"several sources: call /{{source}}/mj/... or set the {SOURCE_HEADER} header "
        f"(sources: {', '.join(sorted(watchers))})",
    )


async def _read(request: web.Request) -> bytes | None:
    """The request body up to MAX_BODY (the server's own limit is for hooks, far smaller)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(1 << 16):
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _is_submit(path: str) -> bool:
    return "/mj/submit/" in path or path.endswith("/mj/insight-face/swap")


def _hook_url(request: web.Request, config: SourceConfig) -> str:
    base = os.environ.get("BRIDGE_PUBLIC_URL") or f"{request.scheme}://{request.host}"
    token = quote(config.push_token or "", safe="")
    return f"{base.rstrip('/')}/hooks/{config.name}?token={token}"


def _with_hook(body: bytes, request: web.Request, config: SourceConfig) -> bytes:
    if not config.push_token or not body.strip():
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # not ours to judge: the upstream answers it
    if not isinstance(data, dict) or data.get("notifyHook"):
        return body  # the caller's own hook stays; the bridge follows the task by polling
    data["notifyHook"] = _hook_url(request, config)
    return orjson.dumps(data)


def _accepted_id(payload: bytes) -> str | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("code") not in ACCEPTED:
        return None
    result = data.get("result")
    if isinstance(result, int) and not isinstance(result, bool):
        result = str(result)
    return result if isinstance(result, str) and result else None


async def forward(request: web.Request) -> web.StreamResponse:
    """One client call, forwarded to the source's upstream unchanged but for notifyHook."""
    routed = _route(request)
    if isinstance(routed, web.Response):
        return routed
    watcher, path = routed
    config = watcher.config
    body = await _read(request)
    if body is None:
        return _error(413, f"body over {MAX_BODY} bytes")
    submit = request.method == "POST" and _is_submit(path)
    if submit:
        body = _with_hook(body, request, config)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    url = config.base_url + path + (f"?{request.query_string}" if request.query_string else "")
    redact = Redactor([s for s in (config.api_key, config.push_token) if s])
    try:
        async with watcher.source.session.request(
            request.method,
            url,
            data=body if body or request.method not in ("GET", "HEAD") else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=max(config.timeout, 60.0)),
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            answer = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = redact(str(exc) or type(exc).__name__)
        log.warning("%s: pass-through %s %s failed: %s", config.name, request.method, path, why)
        return _error(502, f"the upstream did not answer: {why}")
    if submit and status < 300:
        task_id = _accepted_id(payload)
        if task_id is not None:
            await watcher.track([task_id])
            log.debug("%s: submit through the bridge: task %s tracked", config.name, task_id)
    return web.Response(body=payload, status=status, headers=answer)


def _token_ok(request: web.Request, expected: str) -> bool:
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), expected.encode())


def _ids_of(data: Any) -> list[str]:
    """`{"ids": [...]}` -> the ids as text; ValueError(reason)."""
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids:
        raise ValueError('expected {"ids": ["<task id>", ...]}')
    if len(ids) > MAX_IDS:
        raise ValueError(f"at most {MAX_IDS} ids per call")
    out = []
    for item in ids:
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str) or not item.strip():
            raise ValueError("every id must be a non-empty string")
        out.append(item.strip())
    return out


async def track(request: web.Request) -> web.Response:
    """POST /track/{source} {"ids": [...]}: follow these tasks. Auth: the source's push_token as
    ?token= or `Authorization: Bearer`; without a push_token the endpoint is off (404)."""
    watcher = _watchers(request).get(request.match_info["source"])
    if watcher is None:
        return _error(404, "unknown source")
    expected = watcher.config.push_token
    if not expected:
        return _error(404, "tracking by hand is not enabled for this source (no push_token)")
    if not _token_ok(request, expected):
        return _error(401, "missing or wrong token")
    try:
        ids = _ids_of(orjson.loads(await request.read() or b"null"))
    except (orjson.JSONDecodeError, ValueError) as exc:
        return _error(400, str(exc))
    new = await watcher.track(ids)
    return web.Response(
        body=orjson.dumps({"tracked": len(new), "known": len(ids) - len(new), "ids": new}),
        content_type="application/json",
    )


# -- bridge track SOURCE ID... --------------------------------------------------------------------


async def _via_server(config: Config, source: SourceConfig, ids: list[str]) -> int | None:
    """Hand the ids to a running bridge; None when none answers (then the store is written)."""
    if config.server is None or not source.push_token:
        return None
    from bridge.server import parse_listen

    host, port = parse_listen(config.server.listen)
    host = host if host not in (None, "0.0.0.0", "::") else "127.0.0.1"
    shown = f"[{host}]" if ":" in (host or "") else host
    url = f"http://{shown}:{port}/track/{source.name}"
    headers = {"Authorization": f"Bearer {source.push_token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.post(url, json={"ids": ids}, headers=headers) as response,
        ):
            data = await response.json(content_type=None)
            if response.status != 200 or not isinstance(data, dict):
                return None
            return int(data.get("tracked", 0))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


async def track_command(config: Config, db: str, source: str, ids: list[str]) -> int:
    """`bridge track SOURCE ID...`: follow these task ids. A running bridge (server.listen and the
    source's push_token) takes them at once; otherwise they are written to the store, where the
    bridge polling the source finds them at its next poll (or start). Exit code: 0 ok, 2 unknown
    source or no ids."""
    found = next((s for s in config.sources if s.name == source), None)
    if found is None:
        names = ", ".join(s.name for s in config.sources) or "none"
        print(f"bridge track: unknown source {source!r} (sources: {names})", file=sys.stderr)
        return 2
    wanted = [i.strip() for i in ids if i.strip()]
    if not wanted:
        print("bridge track: give at least one task id", file=sys.stderr)
        return 2
    live = await _via_server(config, found, wanted)
    if live is not None:
        print(f"{source}: the running bridge now follows {live} new task id(s)")
        return 0
    store = await Store.open(db)
    try:
        known = await store.load_tasks(source)
        now = time.time()
        new = {tid: TaskState("", -1, now) for tid in dict.fromkeys(wanted) if tid not in known}
        if new:
            await store.commit(source, new, [], [], seen=False)
    finally:
        await store.close()
    print(
        f"{source}: {len(new)} new task id(s) stored ({len(wanted) - len(new)} already known); "
        "the bridge polling this source follows them from its next poll"
    )
    return 0

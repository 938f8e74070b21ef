"""The submit pass-through (mode: ids): clients send their `/mj/...` calls through the bridge,
which forwards the documented Task API paths to the source's upstream with the source's own key
and tracks the id of every accepted submit. Pipeline: pass-through -> Watcher.track -> polls.

Routing: with one source, `/mj/...` (and trueai's `/mj-fast|mj-turbo|mj-relax/mj/...`) goes to
it. With several, `/{source}/mj/...` or the header `X-Bridge-Source: NAME` picks one.
Who may call: a client that sends the source's own api_key in the source's scheme, or one of
`server.passthrough.tokens` (in that scheme or as `Authorization: Bearer`). Nobody else: the
bridge never lends its key to a caller without credentials. Browsers of any other page are
refused (Origin, Sec-Fetch-Site, non-JSON posts, OPTIONS). Bodies are capped and streamed; at
most `server.passthrough.concurrency` calls run at once.
When the source has a push_token, a submit without a notifyHook of its own gets a per-task hook
(push.py) under `server.public_url`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from bridge.config import SourceConfig
from bridge.errors import Redactor
from bridge.server.auth import same
from bridge.server.edge import BodyRefused, SourceHandle, live_of, read_body, refuse, served
from bridge.server.push import HOOKS
from bridge.sources.auth import auth_headers

log = logging.getLogger("bridge.passthrough")

SOURCE_HEADER = "X-Bridge-Source"
ACCEPTED = (1, 21, 22)  # submitted, waiting for modal, queued: each has a task id in `result`
MAX_SUBMIT_ANSWER = 1024 * 1024  # a submit's answer is a few hundred bytes of JSON
TRUEAI_PREFIXES = frozenset({"mj-fast", "mj-turbo", "mj-relax"})
_ID = r"[A-Za-z0-9_-]{1,64}"
_SUBMITS = "action|shorten|modal|imagine|change|simple-change|describe|blend|edits|video"
# The Task API as its implementations serve it (docs/sources.md): method, path.
ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(path))
    for method, path in (
        ("POST", rf"/mj/submit/(?:{_SUBMITS}|upload-discord-images)"),
        ("POST", r"/mj/insight-face/swap"),
        ("GET", rf"/mj/task/{_ID}/fetch"),
        ("GET", rf"/mj/task/{_ID}/image-seed"),
        ("POST", rf"/mj/task/{_ID}/cancel"),
        ("GET", r"/mj/task/(?:list|queue)"),
        ("POST", r"/mj/task/(?:list-by-condition|list-by-ids|query)"),
        ("GET", rf"/mj/image/{_ID}"),
    )
)
# In the raw path: a dot segment, an encoded dot, slash or backslash, a backslash, an empty
# segment, a NUL: whatever the upstream's framework might read differently from this regex.
_TRICKS = re.compile(r"(?:^|/)\.\.?(?:/|$)|%2e|%2f|%5c|%00|\\|//", re.IGNORECASE)
_FORWARDED = ("Content-Type", "Accept", "Accept-Language", "User-Agent")
_ANSWERED = ("Content-Type", "Content-Disposition", "Cache-Control", "Retry-After", "ETag")


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/mj/{tail:.*}", forward)
    app.router.add_route("*", "/{prefix}/mj/{tail:.*}", forward)


def _is_submit(path: str) -> bool:
    return path.startswith("/mj/submit/") or path == "/mj/insight-face/swap"


def _route(request: web.Request, path: str) -> tuple[SourceHandle, str] | web.Response:
    """The source a forwarded call belongs to and the upstream path, or the refusal."""
    handles = live_of(request).sources
    prefix = request.match_info.get("prefix")
    if prefix is not None and prefix in handles:
        return handles[prefix], path[len(prefix) + 1 :]
    if prefix is not None and prefix not in TRUEAI_PREFIXES:
        return refuse(404, "unknown source prefix")
    # trueai's /mj-fast/mj/... goes to the upstream as it is
    named = request.headers.get(SOURCE_HEADER)
    if named:
        if named not in handles:
            return refuse(404, f"unknown source in {SOURCE_HEADER}")
        return handles[named], path
    if len(handles) == 1:
        return next(iter(handles.values())), path
    if not handles:
        return refuse(404, "no sources configured")
    return refuse(
        400,
        f"several sources: call /{{source}}/mj/... or set the {SOURCE_HEADER} header "
        f"(sources: {', '.join(sorted(handles))})",
    )


def _client_ok(request: web.Request, config: SourceConfig, tokens: list[str]) -> bool:
    """The caller sends the source's key in the source's scheme, or a pass-through token in
    that scheme or as `Authorization: Bearer`. Every pair is compared (constant time each)."""
    expected = list(auth_headers(config.auth, config.api_key).items())
    for token in tokens:
        expected += [("Authorization", f"Bearer {token}")]
        expected += auth_headers(config.auth if config.auth != "none" else "bearer", token).items()
    ok = False
    for name, wanted in expected:
        given = request.headers.get(name, "")
        ok |= bool(given) and same(given, wanted)  # no early exit
    return ok


def _browser_refusal(request: web.Request) -> str | None:
    if request.method == "OPTIONS":
        return "no cross-origin calls: OPTIONS is not answered"
    if "Origin" in request.headers:
        return "calls from a web page are refused (Origin)"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "none":
        return f"calls from a web page are refused (Sec-Fetch-Site: {site})"
    if request.method == "POST" and request.content_type != "application/json":
        return "a POST must be application/json"
    return None


def _with_hook(body: bytes, hook: str) -> bytes:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # not ours to judge: the upstream answers it
    if not isinstance(data, dict) or data.get("notifyHook"):
        return body  # the caller's own hook stays; the bridge follows the task by polling
    data["notifyHook"] = hook
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


async def _streamed(request: web.Request, limit: int, patience: float) -> AsyncIterator[bytes]:
    size = 0
    while True:
        async with asyncio.timeout(patience):
            chunk = await request.content.read(1 << 16)
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise BodyRefused(413, f"body over {limit} bytes")
        yield chunk


async def forward(request: web.Request) -> web.StreamResponse:
    """One client call, forwarded to the source's upstream with the source's key."""
    if (why := _browser_refusal(request)) is not None:
        return refuse(405 if request.method == "OPTIONS" else 403, why)
    raw = request.raw_path.split("?", 1)[0]
    if _TRICKS.search(raw):
        return refuse(400, "dot segments, encoded dots or slashes and empty segments are refused")
    routed = _route(request, raw)
    if isinstance(routed, web.Response):
        return routed
    handle, path = routed
    api_path = path.split("/mj/", 1)[-1] if not path.startswith("/mj/") else path[4:]
    if not any(
        method == request.method and rx.fullmatch("/mj/" + api_path) for method, rx in ROUTES
    ):
        return refuse(404, "not a Task API call the bridge forwards")
    config = handle.config
    limits = served(request).config.passthrough
    if not _client_ok(request, config, limits.tokens):
        return refuse(401, "send the source's API key, or a pass-through token")
    try:
        async with asyncio.timeout(served(request).config.header_timeout):
            await served(request).forwarding.acquire()
    except TimeoutError:
        return refuse(503, "too many pass-through calls at once; try again")
    try:
        return await _forward(request, handle, path)
    except BodyRefused as exc:
        return exc.answer()
    finally:
        served(request).forwarding.release()


async def _forward(request: web.Request, handle: SourceHandle, path: str) -> web.StreamResponse:
    config = handle.config
    server = served(request)
    limits = server.config.passthrough
    submit = request.method == "POST" and _is_submit(path[path.index("/mj/") :])
    nonce = None
    body: bytes | AsyncIterator[bytes] | None = None
    if submit:
        body = await read_body(request, limits.max_body)
        if config.push_token and body.strip() and server.public_url:
            hook, nonce = request.app[HOOKS].url(server.public_url, config)
            body = _with_hook(body, hook)
    elif request.method == "POST":
        body = _streamed(request, limits.max_body, server.config.body_timeout)
    headers = {k: v for k in _FORWARDED if (v := request.headers.get(k))}
    headers.update(auth_headers(config.auth, config.api_key))
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    url = URL(config.base_url + path, encoded=True).with_query(request.query)
    redact = Redactor([s for s in (config.api_key, config.push_token, *limits.tokens) if s])
    try:
        async with handle_session(request).request(
            request.method,
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=max(config.timeout, 60.0)),
            allow_redirects=False,
        ) as upstream:
            answer = {k: v for k in _ANSWERED if (v := upstream.headers.get(k))}
            if submit:
                payload = await upstream.content.read(MAX_SUBMIT_ANSWER + 1)
                if len(payload) > MAX_SUBMIT_ANSWER:
                    return refuse(502, "the upstream's submit answer is too large")
                task_id = _accepted_id(payload) if upstream.status < 300 else None
                if task_id is not None:
                    if nonce is not None:
                        request.app[HOOKS].bind(config.name, nonce, task_id)
                    await handle.track([task_id])
                    log.debug(
                        "%s: submit through the bridge: task %s tracked", config.name, task_id
                    )
                return web.Response(body=payload, status=upstream.status, headers=answer)
            return await _stream_back(request, upstream, answer, int(limits.max_answer))
    except BodyRefused:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        cause: BaseException | None = exc
        while cause is not None:  # the client wraps what the streamed body raised
            if isinstance(cause, BodyRefused):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        why = redact(str(exc) or type(exc).__name__)
        log.warning("%s: pass-through %s %s failed: %s", config.name, request.method, path, why)
        return refuse(502, f"the upstream did not answer: {why}")


async def _stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: dict[str, str],
    limit: int,
) -> web.StreamResponse:
    if upstream.content_length is not None and upstream.content_length > limit:
        return refuse(502, f"the upstream's answer is over {limit} bytes")
    response = web.StreamResponse(status=upstream.status, headers=headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    size = 0
    async for chunk in upstream.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            # Headers are gone already: cut the connection so the client sees a broken answer.
            log.warning("pass-through: an upstream answer over %d bytes was cut off", limit)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(chunk)
    await response.write_eof()
    return response


def handle_session(request: web.Request) -> aiohttp.ClientSession:
    return live_of(request).session

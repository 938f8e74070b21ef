"""Canned answers of the simulated upstreams: each flavour's auth refusal, error pages, not-found
answers and the injected faults (HTML, truncated or malformed JSON, wrong shape, empty body).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

FAULTS = (
    "timeout",
    "500",
    "502",
    "401",
    "403",
    "429",
    "html",
    "truncated",
    "malformed",
    "wrong_shape",
    "empty",
)

# new-api answers every route it does not relay with its web UI (gin NoRoute -> index.html).
NEW_API_INDEX = (
    b'<!doctype html><html lang="zh"><head><meta charset="utf-8" />'
    b'<link rel="icon" href="/logo.png" />'
    b'<meta name="viewport" content="width=device-width, initial-scale=1" />'
    b"<title>New API</title>"
    b'<script type="module" crossorigin src="/assets/index-DkLyP4sq.js"></script>'
    b"</head><body><noscript>You need to enable JavaScript to run this app.</noscript>"
    b'<div id="root"></div></body></html>'
)

# What a captive portal, a login wall or a CDN challenge in front of the API looks like.
PORTAL_PAGE = (
    b"<!DOCTYPE html><html><head><title>Just a moment...</title>"
    b'<meta http-equiv="refresh" content="5"></head><body>'
    b"<h1>Checking your browser before accessing the site.</h1>"
    b"<p>This process is automatic. Your browser will redirect shortly.</p></body></html>"
)

NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

MALFORMED = b'[{"id":"1748339029401828","status":SUCCESS,"progress":"100%",}'


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def raw_json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def empty(status: int = 200) -> web.Response:
    """A body-less answer with no content type, as Spring sends for a null return."""
    return web.Response(status=status, body=b"")


def text(body: str, status: int) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain")


def html(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="text/html", charset="utf-8")


def spring_error(status: int, error: str, path: str) -> web.Response:
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return json_response(
        {"timestamp": now, "status": status, "error": error, "path": path}, status=status
    )


def new_api_request_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + f"{time.time_ns() % 10**8:08d}"


def _refused(flavor: str, status: int, trueai: str, new_api: str) -> web.Response:
    if flavor == "trueai":
        return text(trueai, status)
    if flavor == "new-api":
        message = f"{new_api} (request id: {new_api_request_id()})"
        return json_response({"error": {"message": message, "type": "new_api_error"}}, status)
    return empty(status)


def unauthorized(flavor: str) -> web.Response:
    """The flavour's exact answer to a missing or wrong key."""
    return _refused(flavor, 401, "Authorization header missing.", "无效的令牌")


def forbidden(flavor: str) -> web.Response:
    return _refused(flavor, 403, "账号不可用", "用户已被封禁")


def rate_limited(flavor: str) -> web.Response:
    if flavor == "new-api":
        body = {
            "description": "当前分组上游负载已饱和，请稍后再试",  # noqa: RUF001
            "type": "upstream_error",
            "code": 30,
        }
        return json_response(body, 429)
    return empty(429)


def server_error(flavor: str, path: str) -> web.Response:
    match flavor:
        case "trueai":
            return json_response({"code": 9, "description": "系统异常"}, 500)
        case "new-api":
            message = f"upstream error: do request failed (request id: {new_api_request_id()})"
            return json_response({"error": {"message": message, "type": "new_api_error"}}, 500)
    return spring_error(500, "Internal Server Error", path)


def not_found(flavor: str, path: str) -> web.Response:
    match flavor:
        case "trueai":
            return empty(404)
        case "new-api":
            return html(NEW_API_INDEX)
    return spring_error(404, "Not Found", path)


def canned_fault(fault: str, flavor: str, path: str) -> web.Response | None:
    """The answer for a fault that replaces the handler entirely; None for the faults that
    transform the real answer (timeout, truncated, wrong_shape)."""
    match fault:
        case "500":
            return server_error(flavor, path)
        case "502":
            return html(NGINX_502, 502)
        case "401":
            return unauthorized(flavor)
        case "403":
            return forbidden(flavor)
        case "429":
            return rate_limited(flavor)
        case "html":
            return html(PORTAL_PAGE)
        case "malformed":
            return raw_json(MALFORMED)
        case "empty":
            return raw_json(b"")
        case "timeout" | "truncated" | "wrong_shape":
            return None
    return text(f"simulator: unknown fault {fault!r}; expected one of {FAULTS}", 500)


def transform(fault: str, response: web.Response) -> web.Response:
    """truncated: the real JSON cut in half; wrong_shape: the real payload wrapped in an object."""
    body = response.body if isinstance(response.body, bytes) else b""
    if fault == "truncated":
        if len(body) < 4:
            body = b'[{"id":"1748339029401828","status":"SUCC'
        return raw_json(body[: len(body) // 2])
    if fault == "wrong_shape":
        is_json = response.content_type == "application/json" and body
        data = body if is_json else b"null"
        return raw_json(b'{"code":0,"msg":"success","data":' + data + b"}")
    return response


ObjectHandler = Callable[[dict[str, Any], web.Request], Awaitable[web.StreamResponse]]


def bad_request(flavor: str, path: str) -> web.Response:
    """The flavour's answer to a body that is not a JSON object."""
    match flavor:
        case "trueai":
            return json_response({"code": 4, "description": "参数错误"}, 400)
        case "new-api":
            body = {"description": "bind_request_body_failed", "type": "upstream_error", "code": 4}
            return json_response(body, 400)
    return spring_error(400, "Bad Request", path)


def with_object(
    flavor: str, handler: ObjectHandler
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler of a JSON object body (an empty body is {}); anything else is a bad request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            data = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            return bad_request(flavor, request.path)
        return await handler(data, request)

    return handle

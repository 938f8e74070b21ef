"""What an upstream's answers mean, for every request a source makes: an HTTP status as a
SourceError reason, an HTML page refused as no task API, a JSON object checked, a transport error
as a SourceError in a few words. Pure. Pipeline: **source** -> snapshot -> diff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from bridge.errors import SourceError
from bridge.sources.normalize import Body

JSON_TYPE = "application/json"
LIST_PATH = "/mj/task/list"


def is_html(content_type: str, payload: Body) -> bool:
    """A web page (a login page, a relay's front end), whatever the content type claims."""
    return content_type == "text/html" or payload[:100].lstrip()[:1] == b"<"


def refuse_html(where: str, content_type: str, payload: Body) -> None:
    if is_html(content_type, payload):
        raise SourceError(
            "not_a_task_api",
            f"{where} answered text/html, not a JSON task list: this URL is not a "
            f"midjourney-proxy task API (new-api relays do not serve {LIST_PATH}; use mode: ids "
            "or auto, or point base_url at the midjourney-proxy behind the relay)",
        )


def json_object(where: str, content_type: str, payload: Body, what: str) -> dict[str, Any]:
    """An answer that must be one JSON object (a task, a seed answer, a query page)."""
    refuse_html(where, content_type, payload)
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise SourceError("bad_payload", f"{where}: the answer is not valid JSON") from exc
    if not isinstance(data, dict):
        raise SourceError("bad_payload", f"{where}: expected {what}")
    return data


def answer_code(payload: Body) -> object:
    """The `code` of a {code, description} answer, or None."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data.get("code") if isinstance(data, dict) else None


def check_status(status: int, where: str, auth_hint: str = "") -> None:
    if status < 300:
        return
    if status in (401, 403):
        raise SourceError(
            "auth_failed",
            f"{where} answered HTTP {status}: " + (auth_hint or "check api_key and the auth mode"),
        )
    if status == 429:
        raise SourceError("rate_limited", f"{where} answered HTTP 429: too many requests")
    if status >= 500:
        raise SourceError("server_error", f"{where} answered HTTP {status}")
    if status in (404, 405):
        raise SourceError(
            "not_a_task_api",
            f"{where} answered HTTP {status}: no task API here (base_url should be the server's "
            "root, without /mj)",
        )
    raise SourceError("server_error", f"{where} answered HTTP {status}")


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        why = "connection refused" if isinstance(cause, ConnectionRefusedError) else str(cause)
        return f"cannot connect to {exc.host}:{exc.port} ({why})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return str(exc) or type(exc).__name__


def transport_error(
    exc: Exception, where: str, timeout: float, redact: Callable[[str], str]
) -> SourceError:
    """A request that got no whole answer (timeout, cut short, unreachable, not sendable) as
    the poll's failure; `redact` takes the source's key out of the driver's words."""
    if isinstance(exc, TimeoutError):
        return SourceError("timeout", f"{where}: no answer within {timeout:g}s")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return SourceError(
            "bad_payload", f"{where}: the response was cut short ({redact(str(exc))})"
        )
    if isinstance(exc, aiohttp.ClientError | OSError):
        return SourceError("unreachable", f"{where}: {redact(describe_error(exc))}")
    # e.g. user:pass in base_url and an Authorization header
    return SourceError("unreachable", f"{where}: cannot send the request: {redact(str(exc))}")

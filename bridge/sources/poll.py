"""Polling: one read of an upstream's task API -> a Snapshot for the diff.
Pipeline: **source** -> snapshot -> diff -> events. Faults become SourceError(reason, message).

A poll is GET {base_url}/mj/task/list, then POST /mj/task/list-by-condition for every tracked
unfinished task the list did not contain (capped lists such as trueai's 100 newest), in batches of
at most 100 ids. What that lookup does not find goes to `Snapshot.missing`; the diff decides when
it has vanished. Nothing is concluded from a failed request: the whole poll fails instead.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import aiohttp
import orjson

from bridge.config import SourceConfig
from bridge.diff import Snapshot
from bridge.errors import Redactor, SourceError
from bridge.sources.normalize import Normalized, parse_tasks

__all__ = ["BATCH", "PollingSource"]

BATCH = 100  # ids per list-by-condition call (trueai and new-api read them from a DB in one query)
_LIST = "/mj/task/list"
_BY_IDS = "/mj/task/list-by-condition"


def auth_headers(auth: str, api_key: str | None) -> dict[str, str]:
    """The request headers of one auth mode; none without a key."""
    if not api_key:
        return {}
    match auth:
        case "bearer":
            return {"Authorization": f"Bearer {api_key}"}
        case "mj-api-secret":
            return {"mj-api-secret": api_key}
        case "raw":
            return {"Authorization": api_key}
    return {}


class PollingSource:
    """Reads one upstream. The session is shared and owned by the caller: never closed here."""

    def __init__(self, config: SourceConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.name = config.name
        self._session = session
        self._headers = {"Accept": "application/json", **auth_headers(config.auth, config.api_key)}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._redact = Redactor([config.api_key] if config.api_key else [])
        self.dropped = 0  # tasks without a usable id seen in the last poll (for logs/metrics)

    async def poll(self, tracked_unfinished: Collection[str] = ()) -> Snapshot:
        """The whole list plus lookups of the tracked unfinished tasks it did not contain."""
        listed = await self._request("GET", _LIST)
        tasks = listed.tasks
        dropped = len(listed.dropped)
        missing: frozenset[str] = frozenset()
        if tracked_unfinished:
            ids = {task["id"] for task in tasks}
            absent = [tid for tid in tracked_unfinished if tid not in ids]
            if absent:
                found, dropped_by_id = await self._lookup(absent)
                dropped += dropped_by_id
                tasks = tasks + found
                missing = frozenset(absent) - {task["id"] for task in found}
        self.dropped = dropped
        return Snapshot(tasks, missing)

    async def fetch_ids(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The tasks with these ids (unknown ids are simply not in the result)."""
        found, _ = await self._lookup(list(dict.fromkeys(ids)))
        return found

    async def _lookup(self, ids: list[str]) -> tuple[list[dict[str, Any]], int]:
        wanted = set(ids)
        found: list[dict[str, Any]] = []
        dropped = 0
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            result = await self._request("POST", _BY_IDS, {"ids": batch})
            # Some servers answer with more than was asked (or echo the list): keep what we asked.
            found += [task for task in result.tasks if task["id"] in wanted]
            dropped += len(result.dropped)
        return found, dropped

    async def _request(self, method: str, path: str, body: Any = None) -> Normalized:
        url = self.config.base_url + path
        where = f"{method} {self._redact(url)}"
        data = None if body is None else orjson.dumps(body)
        headers = self._headers if data is None else {**self._headers, "Content-Type": _JSON}
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, timeout=self._timeout
            ) as response:
                _check_status(response.status, where)
                payload = await response.read()
                content_type = response.content_type
        except SourceError:
            raise
        except TimeoutError as exc:
            raise SourceError(
                "timeout", f"{where}: no answer within {self.config.timeout:g}s"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise SourceError(
                "bad_payload", f"{where}: the response was cut short ({self._redact(str(exc))})"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise SourceError("unreachable", f"{where}: {self._redact(_describe(exc))}") from exc
        except ValueError as exc:  # e.g. user:pass in base_url and an Authorization header
            raise SourceError(
                "unreachable", f"{where}: cannot send the request: {self._redact(str(exc))}"
            ) from exc
        if content_type == "text/html" or payload[:100].lstrip()[:1] == b"<":
            raise SourceError(
                "not_a_task_api",
                f"{where} answered text/html, not a JSON task list: this URL is not a "
                f"midjourney-proxy task API (new-api relays do not serve {_LIST}; point base_url "
                "at the midjourney-proxy behind the relay)",
            )
        try:
            return parse_tasks(payload)
        except SourceError as exc:
            raise SourceError(exc.reason, f"{where}: {self._redact(str(exc))}") from exc


_JSON = "application/json"


def _check_status(status: int, where: str) -> None:
    if status < 300:
        return
    if status in (401, 403):
        raise SourceError(
            "auth_failed", f"{where} answered HTTP {status}: check api_key and the auth mode"
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        why = "connection refused" if isinstance(cause, ConnectionRefusedError) else str(cause)
        return f"cannot connect to {exc.host}:{exc.port} ({why})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return str(exc) or type(exc).__name__

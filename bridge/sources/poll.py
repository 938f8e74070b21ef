"""`TaskAPI`: the upstream's Task Inquiry API, one method per endpoint, and `poll()` (list mode).
Pipeline: **source** -> snapshot -> diff -> events. Faults become SourceError(reason, message)
(what each answer means: answers.py; the auth scheme: auth.py; the bounded read: body.py). The
other ways of reading (active, ids) combine these calls in modes.py.

A list-mode poll is GET {base_url}/mj/task/list, then POST /mj/task/list-by-condition for every
tracked unfinished task the list did not contain (capped lists such as trueai's 100 newest), in
batches of at most 100 ids. What that lookup does not find goes to `Snapshot.missing`; the diff
decides when it has vanished. Nothing is concluded from a failed request: the poll fails instead.
A poll that met junk rows (junk.py) concludes nothing missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Container, Sequence
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from bridge.config import SourceConfig
from bridge.diff import Snapshot
from bridge.errors import Redactor, SourceError
from bridge.sources.answers import (
    JSON_TYPE,
    LIST_PATH,
    answer_code,
    check_status,
    is_html,
    json_object,
    refuse_html,
    transport_error,
)
from bridge.sources.auth import Auth
from bridge.sources.body import read_body
from bridge.sources.junk import JunkTally, gather, usable
from bridge.sources.normalize import (
    Body,
    Normalized,
    normalize_task,
    normalize_tasks,
    parse_tasks,
)
from bridge.sources.spans import ListSpans

__all__ = ["BATCH", "TaskAPI"]

log = logging.getLogger("bridge.sources")

BATCH = 100  # ids per list-by-condition call (trueai and new-api read them from a DB in one query)
_LIST = LIST_PATH
_BY_IDS = "/mj/task/list-by-condition"
_QUEUE = "/mj/task/queue"
_QUERY = "/mj/task/query"
# Answers larger than this are parsed in a worker thread, off the event loop: a first contact with
# 100,000 tasks parses for seconds, and on the loop it would hold up the lease renewal (lease.py),
# the deliveries and the HTTP server all that time. Below it a parse takes a few ms at most.
OFF_LOOP_BYTES = 256 * 1024


class TaskAPI:
    """Reads one upstream. The session is shared and owned by the caller: never closed here."""

    def __init__(self, config: SourceConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.name = config.name
        self._session = session
        self._auth = Auth(config.name, config.auth, config.api_key)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._redact = Redactor([config.api_key] if config.api_key else [])
        self.dropped = 0  # unusable rows met by the last poll (for tests)
        # Called with the reasons of the unusable rows of each read that met some (metrics).
        self.on_junk: Callable[[Counter[str]], None] | None = None
        # Each answer read: a poll of many requests (pages, lookups) is moving on, not hanging.
        self.on_answer: Callable[[], None] | None = None
        self.list_size: int | None = None  # tasks in the last whole /mj/task/list read
        self._spans = ListSpans()  # what the last whole read held, to skip what did not change

    @property
    def auth(self) -> str:
        """The auth scheme the requests carry (the one detected when the config leaves it out)."""
        return self._auth.scheme

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session (the pass-through forwards client requests through it)."""
        return self._session

    def redact(self, text: str) -> str:
        """`text` with this source's key taken out (for messages built outside this module)."""
        return self._redact(text)

    def tally(self) -> AbstractContextManager[JunkTally]:
        """The span of one poll: the junk rows its requests meet gather here, and when it ends
        without an error they are logged in one warning line (a failed poll has its own line).
        A tally inside a tally is the outer one."""
        return gather(self._report)

    def _report(self, tally: JunkTally) -> None:
        self.dropped = tally.junk
        if tally.junk:
            if self.on_junk is not None:
                self.on_junk(tally.reasons)
            log.warning(
                "%s: %s; no task is concluded missing from this poll",
                self.name,
                self._redact(tally.describe()),
            )

    async def poll(
        self, tracked_unfinished: Collection[str] = (), known: Container[str] = ()
    ) -> Snapshot:
        """The whole list plus lookups of the tracked unfinished tasks it did not contain. Tasks
        in `known` but not in `tracked_unfinished` (held as finished) whose bytes did not change
        since the last read are not parsed and not in the snapshot (spans.py): the diff would
        skip them anyway."""
        with self.tally() as tally:
            open_ = set(tracked_unfinished)

            def settled(tid: str) -> bool:
                return tid in known and tid not in open_

            read = await self._request("GET", _LIST, settled=settled)
            tasks = read.tasks
            self.list_size = read.rows
            missing: frozenset[str] = frozenset()
            if tracked_unfinished:
                ids = {task["id"] for task in tasks}
                absent = [tid for tid in tracked_unfinished if tid not in ids]
                if absent:
                    found = await self._lookup(absent)
                    tasks = tasks + found
                    missing = frozenset(absent) - {task["id"] for task in found}
            return Snapshot(tasks, frozenset() if tally.junk else missing)

    async def check_lookup(self) -> Normalized:
        """An empty list-by-condition: proves the endpoint answers when nothing is tracked."""
        return await self._request("POST", _BY_IDS, {"ids": []})

    async def _lookup(self, ids: list[str]) -> list[dict[str, Any]]:
        wanted = set(ids)
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            result = await self._request("POST", _BY_IDS, {"ids": batch})
            # Some servers answer with more than was asked (or echo the list): keep what we asked.
            found += [task for task in result.tasks if task["id"] in wanted]
        return found

    async def list_tasks(self) -> Normalized:
        """GET /mj/task/list: every task the server lists (trueai: the newest 100)."""
        found = await self._request("GET", _LIST)
        self.list_size = len(found.tasks)
        return found

    async def queue(self) -> Normalized:
        """GET /mj/task/queue: the waiting and running tasks (midjourney-proxy)."""
        return await self._request("GET", _QUEUE)

    async def query(
        self, statuses: Sequence[str] | None, page: int = 0, size: int = 100
    ) -> tuple[Normalized, bool]:
        """POST /mj/task/query (plus): one page, newest first, optionally only `statuses`.
        Returns the page's tasks and whether it was the last page."""
        body: dict[str, Any] = {"pageNumber": page, "pageSize": size, "sort": "id,desc"}
        if statuses:
            body["statusSet"] = list(statuses)
        where, data = await self._object("POST", _QUERY, body)
        content = data.get("content")
        if not isinstance(content, list):
            raise SourceError("bad_payload", f"{where}: expected a Spring page with content[]")
        normalized = usable(where, normalize_tasks(content))
        last = data.get("last")
        return normalized, bool(last) if isinstance(last, bool) else len(content) < size

    async def lookup(self, ids: Collection[str]) -> tuple[list[dict[str, Any]], frozenset[str]]:
        """The tasks with these ids through list-by-condition, and the ids it did not find (none
        when the poll met junk rows: an unusable row may be one of them)."""
        wanted = list(dict.fromkeys(ids))
        with self.tally() as tally:
            found = await self._lookup(wanted)
            if tally.junk:
                return found, frozenset()
            return found, frozenset(wanted) - {task["id"] for task in found}

    async def fetch(self, task_id: str) -> dict[str, Any] | None:
        """GET /mj/task/{id}/fetch; None when the server does not know the id (midjourney-proxy:
        200 with an empty body, trueai: 204, new-api: 400 with code 4)."""
        path = f"/mj/task/{quote(task_id, safe='')}/fetch"
        where, status, content_type, payload = await self._send("GET", path, None, strict=False)
        if status == 204 or (status < 300 and not payload.strip()):
            return None
        if status == 400 and answer_code(payload) in (3, 4):
            return None
        check_status(status, where)
        data = json_object(where, content_type, payload, "a task object")
        try:
            return normalize_task(data)
        except ValueError as exc:
            raise SourceError("bad_payload", f"{where}: {exc}") from exc

    async def cancel(self, task_id: str) -> tuple[bool, Any]:
        """POST /mj/task/{id}/cancel. Returns (accepted, what the server answered); never raises
        for an answer, only for transport failures (SourceError)."""
        path = f"/mj/task/{quote(task_id, safe='')}/cancel"
        _, status, content_type, payload = await self._send("POST", path, b"{}", strict=False)
        answer: Any
        if is_html(content_type, payload):
            return False, f"HTTP {status}: no cancel endpoint here (the server answered HTML)"
        try:
            answer = orjson.loads(payload) if payload.strip() else None
        except orjson.JSONDecodeError:
            answer = payload[:200].decode("utf-8", "replace")
        if status >= 300:
            return False, {"http": status, "body": answer}
        code = answer.get("code") if isinstance(answer, dict) else None
        # trueai answers 200 with an empty body; plus {code: 1}; other codes are refusals.
        return code in (None, 1), answer if answer is not None else {"http": status}

    async def image_seed(self, task_id: str) -> str | None:
        """GET /mj/task/{id}/image-seed: the seed, or None when the server has none for the task.
        SourceError on transport failures and answers that are not the seed API."""
        path = f"/mj/task/{quote(task_id, safe='')}/image-seed"
        where, status, content_type, payload = await self._send("GET", path, None, strict=False)
        if status in (400, 404) and answer_code(payload) is not None:
            return None
        check_status(status, where)
        data = json_object(where, content_type, payload, "{code, description, result}")
        result = data.get("result")
        if data.get("code") != 1 or result in (None, ""):
            return None
        return str(result)

    async def _object(self, method: str, path: str, body: Any) -> tuple[str, dict[str, Any]]:
        where, _, content_type, payload = await self._send(method, path, orjson.dumps(body))
        return where, json_object(where, content_type, payload, "a JSON object")

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        settled: Callable[[str], bool] | None = None,
    ) -> Normalized:
        data = None if body is None else orjson.dumps(body)
        where, _, content_type, payload = await self._send(method, path, data)
        refuse_html(where, content_type, payload)

        def parse() -> Normalized:
            if settled is None:
                return parse_tasks(payload)
            return self._spans.parse(payload, settled)

        try:
            result = await asyncio.to_thread(parse) if len(payload) > OFF_LOOP_BYTES else parse()
        except SourceError as exc:
            raise SourceError(exc.reason, f"{where}: {self._redact(str(exc))}") from exc
        return usable(where, result)

    async def _send(
        self, method: str, path: str, data: bytes | None, *, strict: bool = True
    ) -> tuple[str, int, str, Body]:
        """One request: (where, HTTP status, content type, body). Transport failures, and with
        `strict` every HTTP status >= 300, become SourceError."""
        url = self.config.base_url + path
        where = f"{method} {self._redact(url)}"
        auth = self._auth
        headers = auth.headers if data is None else {**auth.headers, "Content-Type": JSON_TYPE}
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                if auth.first_refusal(status):
                    better = await auth.search(self._session, method, url, data, self._timeout)
                    if better is not None:
                        return await self._send(method, path, data, strict=strict)
                if strict:
                    check_status(response.status, where, auth.hint())
                payload = await read_body(response, where, self.config.max_response)
                if self.on_answer is not None:
                    self.on_answer()
                return where, response.status, response.content_type, payload
        except SourceError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise transport_error(exc, where, self.config.timeout, self._redact) from exc

"""`TaskAPI`: the upstream's Task Inquiry API, one method per endpoint, and `poll()` (list mode).
Pipeline: **source** -> snapshot -> diff -> events. Faults become SourceError(reason, message)
(what each answer means: answers.py). The other ways of reading (active, ids) combine these calls
in modes.py.

A list-mode poll is GET {base_url}/mj/task/list, then POST /mj/task/list-by-condition for every
tracked unfinished task the list did not contain (capped lists such as trueai's 100 newest), in
batches of at most 100 ids. What that lookup does not find goes to `Snapshot.missing`; the diff
decides when it has vanished. Nothing is concluded from a failed request: the poll fails instead.

Rows without a usable id (`{"id": null}`, `{"foo": 1}`) or with a progress that is not a finite
number are junk, not tasks (normalize.py). An answer of junk only is a bad payload
(UnusableRows): the poll fails and counts towards source.down. An answer with some junk is used,
but a poll that met any (its `JunkTally`) concludes nothing missing, since the junk may be the very
tasks it looked for; its junk is logged once, in one warning line and counted in metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from bridge.config import SourceConfig
from bridge.diff import Snapshot
from bridge.errors import Redactor, SourceError
from bridge.sources.answers import (
    AUTH_SCHEMES,
    JSON_TYPE,
    LIST_PATH,
    answer_code,
    auth_headers,
    check_status,
    describe_error,
    is_html,
    json_object,
    refuse_html,
    why,
)
from bridge.sources.normalize import (
    Body,
    Dropped,
    Normalized,
    normalize_task,
    normalize_tasks,
    parse_tasks,
)
from bridge.sources.spans import ListSpans

__all__ = ["BATCH", "JunkTally", "TaskAPI", "UnusableRows"]

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


class UnusableRows(SourceError):
    """An answer of task rows none of which has a usable id (or, to the probe, any such row): the
    endpoint is there but serves junk now. A bad payload, never taken for an empty list."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_payload", message)


@dataclass(slots=True)
class JunkTally:
    """The rows without a usable id met by the requests of one poll: how many, why and where."""

    reasons: Counter[str] = field(default_factory=Counter)
    where: list[str] = field(default_factory=list)

    @property
    def junk(self) -> int:
        return self.reasons.total()

    def add(self, where: str, dropped: Sequence[Dropped]) -> None:
        self.reasons.update(d.reason for d in dropped)
        if where not in self.where:
            self.where.append(where)

    def describe(self) -> str:
        return f"{self.junk} unusable task row(s) ({why(self.reasons)}) from " + (
            ", ".join(self.where)
        )


_TALLY: ContextVar[JunkTally | None] = ContextVar("bridge_sources_tally", default=None)


class TaskAPI:
    """Reads one upstream. The session is shared and owned by the caller: never closed here."""

    def __init__(self, config: SourceConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.name = config.name
        self._session = session
        self._headers = {"Accept": "application/json", **auth_headers(config.auth, config.api_key)}
        # The schemes are tried once, on the first 401/403: to adopt one when the config leaves
        # `auth` out, or to name the one that works when the configured one does not.
        self.auth = config.auth or AUTH_SCHEMES[0]
        self._auth_tried = not config.api_key or config.auth == "none"
        self._works: str | None = None  # the scheme found to work when another is configured
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
    def session(self) -> aiohttp.ClientSession:
        """The shared session (the pass-through forwards client requests through it)."""
        return self._session

    def redact(self, text: str) -> str:
        """`text` with this source's key taken out (for messages built outside this module)."""
        return self._redact(text)

    @contextmanager
    def tally(self) -> Iterator[JunkTally]:
        """The span of one poll: the junk rows its requests meet gather here, and when it ends
        without an error they are logged in one warning line (a failed poll has its own line).
        A tally inside a tally is the outer one."""
        outer = _TALLY.get()
        if outer is not None:
            yield outer
            return
        tally = JunkTally()
        token = _TALLY.set(tally)
        try:
            yield tally
        finally:
            _TALLY.reset(token)
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
        normalized = self._usable(where, normalize_tasks(content))
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
        return self._usable(where, result)

    def _usable(self, where: str, result: Normalized) -> Normalized:
        """A list of junk only is a bad payload, never an empty list; some junk joins the tally."""
        if result.dropped:
            if not result.tasks and not result.unchanged:
                reasons = Counter(d.reason for d in result.dropped)
                raise UnusableRows(
                    f"{where}: none of the {len(result.dropped)} rows is a usable task "
                    f"({why(reasons)})"
                )
            tally = _TALLY.get()
            if tally is not None:
                tally.add(where, result.dropped)
        return result

    async def _send(
        self, method: str, path: str, data: bytes | None, *, strict: bool = True
    ) -> tuple[str, int, str, Body]:
        """One request: (where, HTTP status, content type, body). Transport failures, and with
        `strict` every HTTP status >= 300, become SourceError."""
        url = self.config.base_url + path
        where = f"{method} {self._redact(url)}"
        headers = self._headers if data is None else {**self._headers, "Content-Type": JSON_TYPE}
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                if status in (401, 403) and not self._auth_tried:
                    self._auth_tried = True
                    better = await self._other_auth(method, url, data)
                    if better is not None:
                        return await self._send(method, path, data, strict=strict)
                if strict:
                    check_status(response.status, where, self._auth_hint())
                payload = await self._read(response, where)
                if self.on_answer is not None:
                    self.on_answer()
                return where, response.status, response.content_type, payload
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
            raise SourceError(
                "unreachable", f"{where}: {self._redact(describe_error(exc))}"
            ) from exc
        except ValueError as exc:  # e.g. user:pass in base_url and an Authorization header
            raise SourceError(
                "unreachable", f"{where}: cannot send the request: {self._redact(str(exc))}"
            ) from exc

    async def _read(self, response: aiohttp.ClientResponse, where: str) -> Body:
        """The body, counted while it streams: an answer over `max_response` (one that never
        ends, say) fails the poll with `too_large` instead of filling the memory."""
        limit = self.config.max_response
        too_large = SourceError(
            "too_large",
            f"{where}: the answer is larger than max_response ({limit:,} bytes); "
            "raise max_response if the list is really this large",
        )
        if response.content_length is not None and response.content_length > limit:
            raise too_large
        body = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            if len(body) + len(chunk) > limit:
                raise too_large
            body += chunk
        return body  # a bytearray: no second copy of a large answer

    async def _other_auth(self, method: str, url: str, data: bytes | None) -> str | None:
        """After a 401/403: the first other scheme the server accepts, tried once each. Adopted
        (and returned) when the config left `auth` out; named in the error when it chose one."""
        for scheme in AUTH_SCHEMES:
            if scheme == self.auth:
                continue
            headers = {"Accept": "application/json", **auth_headers(scheme, self.config.api_key)}
            extra = {} if data is None else {"Content-Type": JSON_TYPE}
            try:
                async with self._session.request(
                    method, url, data=data, headers={**headers, **extra}, timeout=self._timeout
                ) as response:
                    accepted = response.status not in (401, 403)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return None  # the poll fails on its own request's answer
            if not accepted:
                continue
            if self.config.auth is None:
                log.info("%s: the upstream accepts auth %r (detected)", self.name, scheme)
                self.auth, self._headers = scheme, headers
                return scheme
            self._works = scheme
            return None
        self._works = ""
        return None

    def _auth_hint(self) -> str:
        if self._works:
            return (
                f"the key is refused with auth: {self.auth} but accepted with auth: "
                f"{self._works}: set `auth: {self._works}` on source {self.name}"
            )
        if self._works == "":
            return f"the key is refused in every scheme ({', '.join(AUTH_SCHEMES)}): check api_key"
        return "check api_key and the auth mode"

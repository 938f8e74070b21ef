"""Push callbacks (`POST /hooks/{source}`) and `POST /track/{source}`: what an upstream or a client
tells the bridge about tasks, between polls.

A pushed body is a hint, not the truth: the bridge fetches each task it names from the upstream
(with its own key) and diffs what the upstream says. A leaked callback URL therefore cannot forge
events; the worst it can do is make the bridge look at a task sooner. Two kinds of token open the
hook: the source's `push_token` (for an upstream-wide hook its operator configures), and per-task
tokens, which the pass-through puts in the notifyHook it injects into a submit: an HMAC, keyed by
the push_token, of a fresh nonce, good for the one task that submit created. The push_token itself
is never injected, so the task's stored notifyHook (which midjourney-proxy shows to anyone who can
read tasks) does not carry it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from bridge.config import SourceConfig
from bridge.errors import SourceError
from bridge.models import STATUS_RANK, Status
from bridge.server.auth import same
from bridge.server.edge import BodyRefused, json_answer, live_of, read_body, refuse
from bridge.sources.normalize import normalize_task

log = logging.getLogger("bridge.server.push")

MAX_BODY = 1024 * 1024  # a notifyHook body is one task, a few KB; anything near this is not one
MAX_TASKS = 50  # tasks named by one push (each is fetched)
MAX_IDS = 1000  # ids per POST /track
_BINDINGS = 100_000  # nonce -> task id bindings kept in memory


def _key(config: SourceConfig) -> bytes:
    assert config.push_token
    return hmac.new(config.push_token.encode(), b"mj-bridge task hook", hashlib.sha256).digest()


def _sign(config: SourceConfig, nonce: str) -> str:
    mac = hmac.new(_key(config), f"{config.name}:{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


class TaskHooks:
    """Per-task hook URLs and which task each one belongs to. The binding is made when the
    upstream answers the submit (or, after a restart, by the first push), in memory."""

    def __init__(self) -> None:
        self._bound: OrderedDict[tuple[str, str], str] = OrderedDict()

    def url(self, public_url: str, config: SourceConfig) -> tuple[str, str]:
        """A fresh hook URL for one submit, and its nonce."""
        nonce = secrets.token_urlsafe(12)
        query = f"task={nonce}&token={_sign(config, nonce)}"
        return f"{public_url.rstrip('/')}/hooks/{quote(config.name)}?{query}", nonce

    def bind(self, source: str, nonce: str, task_id: str) -> None:
        self._bound[(source, nonce)] = task_id
        self._bound.move_to_end((source, nonce))
        while len(self._bound) > _BINDINGS:
            self._bound.popitem(last=False)

    def valid(self, config: SourceConfig, nonce: str, token: str) -> bool:
        return same(token, _sign(config, nonce))

    def refusal(self, source: str, nonce: str, ids: list[str]) -> str | None:
        """Why a per-task push may not name these ids, or None (and the binding is made)."""
        if len(ids) != 1:
            return "a task's hook carries that one task"
        bound = self._bound.get((source, nonce))
        if bound is None:
            self.bind(source, nonce, ids[0])
            return None
        return None if bound == ids[0] else "this hook belongs to another task"


HOOKS: web.AppKey[TaskHooks] = web.AppKey("task-hooks")


def tasks_of(body: bytes) -> list[dict[str, Any]]:
    """The task (or JSON array of tasks) of a notifyHook body, normalised; ValueError(reason)."""
    if not body.strip():
        raise ValueError("empty body, expected the task JSON")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from exc
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError("expected a task object or a non-empty JSON array of task objects")
    tasks = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"item {index} is not a JSON object")
        try:
            task = normalize_task(item)
        except ValueError as exc:
            raise ValueError(f"task {index}: {exc}") from exc
        if task["status"] not in STATUS_RANK.keys() - {""} and not task.get("progress"):
            # `{"id": "x"}` is not a task: it would reach every target as a status-less event.
            raise ValueError(
                f"task {index}: neither a known status ({', '.join(Status)}) nor a progress; "
                "expected the task JSON midjourney-proxy's notifyHook sends"
            )
        tasks.append(task)
    return tasks


async def hook(request: web.Request) -> web.Response:
    """midjourney-proxy's notifyHook: the task JSON as fetch serves it; verified by a fetch."""
    live = live_of(request)
    name = request.match_info["source"]
    handle = live.sources.get(name)
    if handle is None:
        return refuse(404, "unknown source")
    config = handle.config
    if not config.push_token:
        return refuse(404, "push is not enabled for this source (no push_token)")
    nonce = request.query.get("task")
    given = request.query.get("token", "")
    hooks = request.app[HOOKS]
    ok = hooks.valid(config, nonce, given) if nonce else same(given, config.push_token)
    if not ok:
        return refuse(401, "missing or wrong token")
    try:
        tasks = tasks_of(await read_body(request, MAX_BODY))
    except BodyRefused as exc:
        return exc.answer()
    except ValueError as exc:
        return refuse(400, str(exc))
    ids = list(dict.fromkeys(str(t["id"]) for t in tasks))
    if len(ids) > MAX_TASKS:
        return refuse(400, f"at most {MAX_TASKS} tasks per push")
    if nonce and (why := hooks.refusal(name, nonce, ids)) is not None:
        log.warning("%s: refused a push through a task's hook: %s", name, why)
        return refuse(403, why)
    fetched: list[dict[str, Any]] = []
    try:
        for task_id in ids:
            task = await handle.fetch(task_id)
            if task is not None:
                fetched.append(task)
    except SourceError as exc:
        # The upstream cannot confirm now: follow the ids; the next poll reads them.
        new = await handle.track(ids)
        log.info("%s: push not verified (%s); %d id(s) followed by polling", name, exc, len(new))
        return json_answer({"accepted": 0, "events": [], "verify": "later"}, status=202)
    events = await handle.push(fetched) if fetched else []
    log.debug("%s: push of %d task(s), %d new event(s)", name, len(fetched), len(events))
    answer: dict[str, Any] = {"accepted": len(fetched), "events": [e.type for e in events]}
    if len(fetched) < len(ids):
        answer["unknown"] = len(ids) - len(fetched)  # the upstream does not know them
    return json_answer(answer)


def _token_ok(request: web.Request, expected: str) -> bool:
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return same(given, expected)


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
    handle = live_of(request).sources.get(request.match_info["source"])
    if handle is None:
        return refuse(404, "unknown source")
    expected = handle.config.push_token
    if not expected:
        return refuse(404, "tracking by hand is not enabled for this source (no push_token)")
    if not _token_ok(request, expected):
        return refuse(401, "missing or wrong token")
    try:
        ids = _ids_of(orjson.loads(await read_body(request, MAX_BODY) or b"null"))
    except BodyRefused as exc:
        return exc.answer()
    except (orjson.JSONDecodeError, ValueError) as exc:
        return refuse(400, str(exc))
    new = await handle.track(ids)
    return json_answer({"tracked": len(new), "known": len(ids) - len(new), "ids": new})

"""The JSON API under /api/ for operators and their scripts: events (filtered, paged with a
cursor), one event with its deliveries, one task (its state, events and deliveries), dead letters;
the OpenAPI document at /api/openapi.json. Read-only, behind `server.auth` like the status page."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bridge.errors import Redactor
from bridge.server.auth import operator
from bridge.server.edge import json_answer, live_of, refuse
from bridge.server.openapi import DOCUMENT, EVENT_ID, MAX_TYPES, SOURCE, TEXT, TYPE
from bridge.store import OutboxRow
from bridge.store.history import (
    MAX_LIMIT,
    CursorError,
    EventQuery,
    StoredEvent,
    dead_cursor,
)

DEFAULT_LIMIT = 50
# The parameters' shapes, as the OpenAPI document states them.
_SHAPES = {
    name: re.compile(pattern)
    for name, pattern in (
        ("type", TYPE),
        ("source", SOURCE),
        ("task", TEXT),
        ("q", TEXT),
        ("target", TEXT),
        ("id", EVENT_ID),
        ("cursor", r"^.{1,256}$"),  # history.decode_cursor says what is wrong with it
        ("since", r"^.{1,64}$"),
        ("until", r"^.{1,64}$"),
        ("limit", r"^[0-9]{1,4}$"),
    )
}


class _BadQuery(Exception):
    pass


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/events/{id}", event)
    app.router.add_get("/api/tasks/{source}/{id}", task)
    app.router.add_get("/api/dead-letters", dead_letters)
    # Anything else under /api/ (an empty id, a path of its own) is a JSON 404 too.
    app.router.add_get("/api/{tail:.*}", unknown)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: str, name: str, shape: str | None = None) -> str:
    if not _SHAPES[shape or name].fullmatch(value):
        raise _BadQuery(f"{name} is not valid (see /api/openapi.json)")
    return value


def _one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _BadQuery(f"{name} may be given once")
    return _text(values[0], name) if values else None


def _time(request: web.Request, name: str) -> float | None:
    value = _one(request, name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            raise ValueError("no zone")
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        raise _BadQuery(f"{name} must be an RFC 3339 time with a zone") from None


def _limit(request: web.Request) -> int:
    values = request.query.getall("limit", [])
    if len(values) > 1:
        raise _BadQuery("limit may be given once")
    if not values:
        return DEFAULT_LIMIT
    value = values[0]
    if not (_SHAPES["limit"].fullmatch(value) and 1 <= int(value) <= MAX_LIMIT):
        raise _BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def _delivery(row: OutboxRow, redact: Redactor) -> dict[str, Any]:
    item = row.item
    return {
        "id": item.id,
        "event_id": item.event_id,
        "target": item.target,
        "rule": item.rule,
        "state": row.state,
        "attempts": item.attempts,
        "created_at": iso(item.created_at),
        "updated_at": iso(row.updated_at),
        "next_at": iso(item.next_at) if row.state in ("pending", "inflight") else None,
        "last_error": redact(item.last_error) if item.last_error else None,
    }


def _event(stored: StoredEvent) -> dict[str, Any]:
    return stored.event.cloudevent()


def _guarded(handler: Any) -> Any:
    """Bad query parameters and cursors are a 400 with a reason, never a 500."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except (_BadQuery, CursorError) as exc:
            return refuse(400, str(exc))

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@operator
async def unknown(request: web.Request) -> web.Response:
    return refuse(404, "no such API path (see /api/openapi.json)")


@operator
async def openapi(request: web.Request) -> web.Response:
    return json_answer(DOCUMENT)


@operator
@_guarded
async def events(request: web.Request) -> web.Response:
    """Events newest first, filtered; `next` is the cursor of the following page (null at the
    end)."""
    types = [_text(t, "type") for t in request.query.getall("type", [])]
    if len(types) > MAX_TYPES:
        raise _BadQuery(f"at most {MAX_TYPES} types")
    limit = _limit(request)
    query = EventQuery(
        types=types,
        source=_one(request, "source"),
        task=_one(request, "task"),
        text=_one(request, "q"),
        since=_time(request, "since"),
        until=_time(request, "until"),
        before=_one(request, "cursor"),
        limit=limit,
    )
    page = await live_of(request).store.history.events(query)
    more = len(page) == limit
    return json_answer(
        {"events": [_event(s) for s in page], "next": page[-1].cursor if more else None}
    )


@operator
@_guarded
async def event(request: web.Request) -> web.Response:
    live = live_of(request)
    event_id = _text(request.match_info["id"], "id")
    stored = await live.store.history.event(event_id)
    if stored is None:
        return refuse(404, "no such event")
    redact = Redactor(live.config.secrets())
    rows = await live.store.history.deliveries([event_id])
    return json_answer(
        {"event": _event(stored), "deliveries": [_delivery(r, redact) for r in rows]}
    )


@operator
@_guarded
async def task(request: web.Request) -> web.Response:
    live = live_of(request)
    source = _text(request.match_info["source"], "source")
    task_id = _text(request.match_info["id"], "id", "task")
    view = await live.store.history.task(source, task_id)
    if view.state is None and not view.events:
        return refuse(404, "no such task")
    redact = Redactor(live.config.secrets())
    state = view.state
    return json_answer(
        {
            "source": source,
            "id": task_id,
            "state": None
            if state is None
            else {
                "status": state.status,
                "progress": state.progress,
                "finished": state.finished,
                "stalled": state.stalled,
                "changed_at": iso(state.changed_at),
            },
            "events": [_event(s) for s in view.events],
            "deliveries": [_delivery(r, redact) for r in view.deliveries],
        }
    )


@operator
@_guarded
async def dead_letters(request: web.Request) -> web.Response:
    """Dead letters newest first (by when they died), optionally of one target."""
    live = live_of(request)
    limit = _limit(request)
    rows = await live.store.history.dead(
        _one(request, "target"), limit, before=_one(request, "cursor")
    )
    redact = Redactor(live.config.secrets())
    more = len(rows) == limit
    return json_answer(
        {
            "dead_letters": [
                {**_delivery(r, redact), "event": r.item.event.cloudevent()} for r in rows
            ],
            "next": dead_cursor(rows[-1]) if more else None,
        }
    )

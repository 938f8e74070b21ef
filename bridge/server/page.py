"""The status page (sources, deliveries waiting, recent events, dead letters) and its replay
buttons; behind `server.auth` when configured, every form post with the session's CSRF token."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from bridge.errors import Redactor
from bridge.server.auth import OPERATOR, csrf_ok, csrf_token, keep_session, operator
from bridge.server.edge import BodyRefused, Live, live_of, read_body

log = logging.getLogger("bridge.server")

REFRESH_SECONDS = 5  # the status page reloads itself this often
_WEB = Path(__file__).parent.parent / "web"
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def _when(ts: float | datetime | None) -> str:
    if ts is None:
        return "never"
    moment = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ts: float | datetime | None) -> str:
    if ts is None:
        return "never"
    seconds = time.time() - (ts.timestamp() if isinstance(ts, datetime) else ts)
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_WEB),
        autoescape=True,  # prompts, fail reasons and errors are untrusted text
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,
    )
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    return env


_env = _environment()


def render(template: str, **context: Any) -> web.Response:
    """A page of bridge/web/, with the headers every page gets (no framing, no scripts)."""
    html = _env.get_template(template).render(**context)
    response = web.Response(text=html, content_type="text/html")
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Frame-Options"] = "DENY"
    return response


@dataclass(frozen=True, slots=True)
class _SourceRow:
    name: str
    state: str  # up | failing | down | waiting
    base: str
    push: bool
    last_ok: float | None
    last_error: str | None
    tracked: int
    unfinished: int
    polls: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class _TargetRow:
    name: str
    kind: str
    waiting: int
    dead: int


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


async def _page_context(live: Live, redactor: Redactor) -> dict[str, Any]:
    store = live.store
    sources = []
    for name, handle in live.sources.items():
        status = handle.status
        if not status.up:
            state = "down"
        elif handle.failing:
            state = "failing"
        elif status.last_ok is None:
            state = "waiting"
        else:
            state = "up"
        sources.append(
            _SourceRow(
                name=name,
                state=state,
                base=_host_of(handle.config.base_url),
                push=bool(handle.config.push_token),
                last_ok=status.last_ok,
                last_error=redactor(status.last_error) if status.last_error else None,
                tracked=status.tracked,
                unfinished=status.unfinished,
                polls=status.polls,
                note=status.note,
            )
        )
    depth = await store.outbox_depth()
    dead_count = await store.dead_count()
    targets = [
        _TargetRow(
            name=name, kind=cfg.kind, waiting=depth.get(name, 0), dead=dead_count.get(name, 0)
        )
        for name, cfg in live.config.targets.items()
    ]
    return {
        "sources": sources,
        "targets": targets,
        "events": await store.recent_events(30),
        "deliveries": await store.recent_deliveries(20),
        "dead": await store.dead_letters(100),
        "dead_total": sum(dead_count.values()),
        "redact": redactor,
    }


@operator(page=True)
async def status_page(request: web.Request) -> web.Response:
    live = live_of(request)
    context = await _page_context(live, Redactor(live.config.secrets()))
    replayed = request.query.get("replayed", "")
    response = render(
        "index.html",
        **context,
        csrf=csrf_token(request),
        refresh=REFRESH_SECONDS,
        replayed=int(replayed) if replayed.isdigit() else None,
        now=time.time(),
        user=request[OPERATOR],
    )
    keep_session(request, response)
    return response


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=(_WEB / "style.css").read_bytes(), content_type="text/css")


@operator
async def replay(request: web.Request) -> web.StreamResponse:
    """The status page's replay buttons: form field `id` (one or more) or `all=1`."""
    live = live_of(request)
    try:
        body = await read_body(request, 1024 * 1024)
    except BodyRefused as exc:
        return exc.answer()
    from urllib.parse import parse_qsl

    fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    form = dict(fields)
    if (why := csrf_ok(request, form.get("csrf", ""))) is not None:
        log.warning("refused a replay: %s", why)
        raise web.HTTPForbidden(text=f"{why}\n")
    if form.get("all") == "1":
        count = await live.store.replay(None)
    else:
        ids = [value for key, value in fields if key == "id"]
        if not ids:
            raise web.HTTPBadRequest(text="nothing to replay: give id or all=1\n")
        count = await live.store.replay(ids)
    if count:
        live.wake()
    log.info("%s replayed %d dead letter(s) from the status page", request[OPERATOR], count)
    raise web.HTTPSeeOther(location=f"/?replayed={count}")

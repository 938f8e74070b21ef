"""The status page (failing targets first, sources, deliveries waiting, the latest images, events
filtered by source, type and text and paged, dead letters paged) and its replay buttons; behind
`server.auth` when configured, every form post with the session's CSRF token."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
from aiohttp import web

from bridge.errors import Redactor
from bridge.models import EVENT_TYPES, Event
from bridge.server.auth import OPERATOR, csrf_ok, csrf_token, keep_session, next_path, operator
from bridge.server.edge import SERVED, BodyRefused, Live, live_of, read_body
from bridge.store.history import CursorError, EventQuery, dead_cursor

log = logging.getLogger("bridge.server")

REFRESH_SECONDS = 5  # the status page reloads itself this often
EVENTS_PAGE = 30
DEAD_PAGE = 50
THUMBNAILS = 12
_WEB = Path(__file__).parent.parent / "web"
# Thumbnails load from the upstreams themselves (their CDN links) or any https host: task images
# live on Discord's CDN or the proxy's own. Never scripts, frames or other origins' styles.
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' https: {upstreams}; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
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


def render(template: str, *, images_from: str = "", **context: Any) -> web.Response:
    """A page of bridge/web/, with the headers every page gets (no framing, no scripts).
    `images_from`: more origins images may load from (the upstreams, space-separated)."""
    html = _env.get_template(template).render(**context)
    response = web.Response(text=html, content_type="text/html")
    response.headers["Content-Security-Policy"] = _CSP.format(upstreams=images_from).replace(
        "  ", " "
    )
    response.headers["X-Frame-Options"] = "DENY"
    return response


@dataclass(frozen=True, slots=True)
class _SourceRow:
    name: str
    state: str  # up | failing | down | waiting | polling (the first poll) | standby
    base: str
    push: bool
    last_ok: float | None
    last_error: str | None
    tracked: int
    unfinished: int
    polls: int
    note: str = ""
    last_error_at: float | None = None


@dataclass(frozen=True, slots=True)
class _TargetRow:
    name: str
    kind: str
    waiting: int
    dead: int
    failing_since: float | None = None
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok: float | None = None


@dataclass(frozen=True, slots=True)
class Filters:
    """The page's query: events by source, type and text, and where each list is paged to."""

    source: str = ""
    type: str = ""
    q: str = ""
    target: str = ""  # dead letters of one target
    events_before: str = ""
    dead_before: str = ""

    @classmethod
    def of(cls, query: Mapping[str, str]) -> Filters:
        def get(name: str, longest: int = 200) -> str:
            value = query.get(name, "").strip()
            return value if len(value) <= longest and "\x00" not in value else ""

        return cls(
            source=get("source"),
            type=get("type"),
            q=get("q"),
            target=get("target"),
            events_before=get("events_before"),
            dead_before=get("dead_before"),
        )

    def link(self, **change: str) -> str:
        """This page's URL with some parameters changed ("" drops one)."""
        values = {
            "source": self.source,
            "type": self.type,
            "q": self.q,
            "target": self.target,
            "events_before": self.events_before,
            "dead_before": self.dead_before,
            **change,
        }
        query = urlencode({k: v for k, v in values.items() if v})
        return "/" + (f"?{query}" if query else "")


def image_of(event: Event) -> str | None:
    """The finished task's thumbnail (or image) URL, when it is an http(s) one."""
    task = event.task or {}
    for key in ("thumbnailUrl", "imageUrl"):
        url = task.get(key)
        if isinstance(url, str) and url.startswith(("https://", "http://")) and len(url) < 4096:
            return url
    return None


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


async def _page_context(live: Live, redactor: Redactor, filters: Filters) -> dict[str, Any]:
    store = live.store
    history = store.history
    sources = []
    for name, handle in live.sources.items():
        status = handle.status
        if not handle.leading:
            state = "standby"  # another replica holds the source's lease and polls it
        elif not status.up:
            state = "down"
        elif handle.failing:
            state = "failing"
        elif status.last_ok is None:
            state = "waiting" if status.polling_since is None else "polling"  # the first poll
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
                last_error_at=status.last_error_at if status.last_error else None,
                tracked=status.tracked,
                unfinished=status.unfinished,
                polls=status.polls,
                note=status.note,
            )
        )
    depth = await store.outbox_depth()
    dead_count = await store.dead_count()
    health = live.targets
    targets = []
    for name, cfg in live.config.targets.items():
        h = health.get(name)
        targets.append(
            _TargetRow(
                name=name,
                kind=cfg.kind,
                waiting=depth.get(name, 0),
                dead=dead_count.get(name, 0),
                failing_since=h.failing_since if h else None,
                failures=h.failures if h else 0,
                last_error=redactor(h.last_error) if h and h.last_error else None,
                last_error_at=h.last_error_at if h else None,
                last_ok=h.last_ok if h else None,
            )
        )
    # Failing targets first, the longest-failing at the top.
    targets.sort(key=lambda t: (t.failing_since is None, t.failing_since or 0.0, t.name))
    problems: list[str] = []
    query = EventQuery(
        types=[filters.type] if filters.type else (),
        source=filters.source or None,
        text=filters.q or None,
        before=filters.events_before or None,
        limit=EVENTS_PAGE,
    )
    try:
        events = await history.events(query)
    except CursorError:
        problems.append("That events page is gone or the link was cut; showing the newest.")
        events = await history.events(replace(query, before=None))
    try:
        dead = await history.dead(filters.target or None, DEAD_PAGE, filters.dead_before or None)
    except CursorError:
        problems.append("That dead letters page is gone or the link was cut; showing the newest.")
        dead = await history.dead(filters.target or None, DEAD_PAGE)
    images = [
        (stored, url)
        for stored in await history.events(EventQuery(types=["task.succeeded"], limit=THUMBNAILS))
        if (url := image_of(stored.event)) is not None
    ]
    return {
        "sources": sources,
        "targets": targets,
        "failing": [t for t in targets if t.failing_since is not None],
        "events": events,
        "events_next": events[-1].cursor if len(events) == EVENTS_PAGE else None,
        "images": images,
        "image_of": image_of,
        "deliveries": await store.recent_deliveries(20),
        "dead": dead,
        "dead_next": dead_cursor(dead[-1]) if len(dead) == DEAD_PAGE else None,
        "dead_total": sum(dead_count.values()),
        "problems": problems,
        "filters": filters,
        "source_names": list(live.sources),
        "target_names": list(live.config.targets),
        "event_types": EVENT_TYPES,
        "redact": redactor,
    }


@operator(page=True)
async def status_page(request: web.Request) -> web.Response:
    live = live_of(request)
    filters = Filters.of(request.query)
    context = await _page_context(live, Redactor(live.config.secrets()), filters)
    replayed = request.query.get("replayed", "")
    upstreams = " ".join(
        sorted({_host_of(h.config.base_url) for h in live.sources.values()} - {"://"})
    )
    response = render(
        "index.html",
        images_from=upstreams,
        **context,
        csrf=csrf_token(request),
        # Only the live view reloads itself: not a filtered or paged one (or a search being typed
        # would be lost), nor when paused.
        refresh=REFRESH_SECONDS
        if filters.link() == "/" and request.query.get("refresh") != "off"
        else 0,
        refresh_url="/",
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


async def login_form(request: web.Request) -> web.Response:
    auth = request.app[SERVED].config.auth
    return render(
        "login.html",
        next=next_path(request.query.get("next", "/")),
        users=bool(auth and auth.users),
        token=bool(auth and auth.token),
        failed=request.query.get("failed") == "1",
    )

"""HTTP for operators, beside the pipeline: push callbacks enter it here (`POST /hooks/{source}`),
and health, readiness, Prometheus metrics and the status page (with dead-letter replay) read it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jinja2
import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.errors import Redactor
from bridge.models import STATUS_RANK, Status
from bridge.passthrough import add_routes
from bridge.sources.normalize import normalize_task

if TYPE_CHECKING:
    from bridge.app import Bridge, Running

__all__ = ["MAX_BODY", "build_app", "serve", "server_url"]

log = logging.getLogger("bridge.server")

MAX_BODY = 1024 * 1024  # a notifyHook body is one task, a few KB; anything near this is not one
READY_INTERVALS = 3  # /readyz: every source answered within this many poll intervals
REFRESH_SECONDS = 5  # the status page reloads itself this often
CSRF_COOKIE = "bridge_csrf"

# One per process: the status page puts it in a hidden field and a SameSite=Strict cookie, and a
# replay must bring both back. A page loaded before a restart must be reloaded to replay.
_CSRF_TOKEN = secrets.token_urlsafe(32)
_WEB = Path(__file__).parent / "web"
_BRIDGE_KEY: web.AppKey[Bridge] = web.AppKey("bridge")


def server_url(bridge: Bridge) -> str | None:
    """Where the bridge's server listens ("http://127.0.0.1:PORT"), while it does."""
    return bridge.server_url


# -- listening ------------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str | None, int]:
    """`127.0.0.1:8787`, `[::1]:8787`, `:8787` (every interface) -> (host or None, port)."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"server.listen must be HOST:PORT or :PORT, got {listen!r}")
    host = host.strip("[]")
    return (host or None), int(port)


class _AccessLogger(AbstractAccessLogger):
    """One debug line per request; the path only (a hook's ?token= never reaches a log)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


@asynccontextmanager
async def serve(bridge: Bridge, listen: str) -> AsyncIterator[web.AppRunner]:
    """Serve `build_app(bridge)` on `listen` until the block exits; `server_url(bridge)` says
    where (port 0 picks a free port)."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(
        build_app(bridge),
        access_log_class=_AccessLogger,
        access_log=logging.getLogger("bridge.access"),
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = host or "127.0.0.1"
        shown = f"[{shown}]" if ":" in shown else shown
        url = f"http://{shown}:{bound[1]}"
        bridge.server_url = url
        log.info("serving on %s (status page, /healthz, /readyz, /metrics, /hooks/SOURCE)", url)
        yield runner
    finally:
        bridge.server_url = None
        await runner.cleanup()


def build_app(bridge: Bridge) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_security_headers])
    app[_BRIDGE_KEY] = bridge
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/hooks/{source}", hook)
    app.router.add_get("/", status_page)
    app.router.add_post("/dlq/replay", replay)
    app.router.add_get("/static/style.css", stylesheet)
    add_routes(app, bridge)  # /mj/... pass-through to the upstream, POST /track/{source}
    return app


def _bridge(request: web.Request) -> Bridge:
    return request.app[_BRIDGE_KEY]


def _running(request: web.Request) -> Running:
    running = _bridge(request).running
    if running is None:  # between two configurations during a reload
        raise web.HTTPServiceUnavailable(text="starting\n")
    return running


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _security_headers(request: web.Request, handler: _Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # Not no-referrer: with it Chromium sends `Origin: null` on the page's own forms.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# -- health and metrics ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready when every source's last good poll is within 3 poll intervals."""
    running = _running(request)
    now = time.time()
    sources: dict[str, str] = {}
    ready = True
    for name, watcher in running.watchers.items():
        limit = READY_INTERVALS * watcher.config.poll_interval
        last_ok = watcher.status.last_ok
        if not watcher.leading:
            sources[name] = "polled by another replica"  # it holds the source's lease
        elif last_ok is None:
            sources[name], ready = "no successful poll yet", False
        elif now - last_ok > limit:
            sources[name], ready = (
                f"no successful poll for {now - last_ok:.1f}s (limit {limit:g}s)",
                False,
            )
        else:
            sources[name] = f"ok (last poll {now - last_ok:.1f}s ago)"
    return _json({"ready": ready, "sources": sources}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    bridge = _bridge(request)
    running = _running(request)
    depth = await running.store.outbox_depth()
    dead = await running.store.dead_count()
    bridge.metrics.set_outbox(depth, dead, sorted({*running.config.targets, *depth, *dead}))
    for name, watcher in running.watchers.items():
        bridge.metrics.source_up.labels(name).set(1 if watcher.status.up else 0)
    bridge.metrics.set_targets(running.deliverer.health)
    return web.Response(body=bridge.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- push callbacks -------------------------------------------------------------------------------


def _refuse(status: int, reason: str) -> web.Response:
    return _json({"error": reason}, status=status)


def _tasks_of(body: bytes) -> list[dict[str, Any]]:
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
    """midjourney-proxy's notifyHook: the task JSON as fetch serves it. Diffed like a poll."""
    running = _running(request)
    name = request.match_info["source"]
    watcher = running.watchers.get(name)
    if watcher is None:
        return _refuse(404, "unknown source")
    expected = watcher.config.push_token
    if not expected:
        return _refuse(404, "push is not enabled for this source (no push_token)")
    given = request.query.get("token", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return _refuse(401, "missing or wrong token")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _refuse(413, f"body over {MAX_BODY} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _refuse(413, f"body over {MAX_BODY} bytes")
    try:
        tasks = _tasks_of(body)
    except ValueError as exc:
        return _refuse(400, str(exc))
    events = await watcher.push(tasks)
    log.debug("%s: push of %d task(s), %d new event(s)", name, len(tasks), len(events))
    return _json({"accepted": len(tasks), "events": [e.type for e in events]})


# -- status page ----------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class _TargetRow:
    name: str
    kind: str
    waiting: int
    dead: int


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


async def _page_context(running: Running, redactor: Redactor) -> dict[str, Any]:
    store = running.store
    sources = []
    for name, watcher in running.watchers.items():
        status = watcher.status
        if not status.up:
            state = "down"
        elif watcher.health.failures:
            state = "failing"
        elif status.last_ok is None:
            state = "waiting"
        else:
            state = "up"
        sources.append(
            _SourceRow(
                name=name,
                state=state,
                base=_host_of(watcher.config.base_url),
                push=bool(watcher.config.push_token),
                last_ok=status.last_ok,
                last_error=redactor(status.last_error) if status.last_error else None,
                tracked=status.tracked,
                unfinished=status.unfinished,
                polls=status.polls,
            )
        )
    depth = await store.outbox_depth()
    dead_count = await store.dead_count()
    targets = [
        _TargetRow(
            name=name,
            kind=cfg.kind,
            waiting=depth.get(name, 0),
            dead=dead_count.get(name, 0),
        )
        for name, cfg in running.config.targets.items()
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


async def status_page(request: web.Request) -> web.Response:
    running = _running(request)
    context = await _page_context(running, Redactor(running.config.secrets()))
    replayed = request.query.get("replayed", "")
    html = _env.get_template("index.html").render(
        **context,
        csrf=_CSRF_TOKEN,
        refresh=REFRESH_SECONDS,
        replayed=int(replayed) if replayed.isdigit() else None,
        now=time.time(),
    )
    response = web.Response(text=html, content_type="text/html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.set_cookie(CSRF_COOKIE, _CSRF_TOKEN, httponly=True, samesite="Strict", path="/")
    return response


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=(_WEB / "style.css").read_bytes(), content_type="text/css")


def _cross_site(request: web.Request) -> str | None:
    """Why a state-changing request looks cross-site, or None when it comes from this page."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("Origin")
    if origin is not None:
        own = f"{request.scheme}://{request.host}"
        if origin.lower() != own.lower():
            return "foreign Origin"
    return None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def replay(request: web.Request) -> web.Response:
    """The status page's replay buttons: form field `id` (one or more) or `all=1`."""
    running = _running(request)
    why = _cross_site(request)
    if why is not None:
        log.warning("refused a cross-site replay (%s)", why)
        raise web.HTTPForbidden(text=f"cross-site request refused ({why})\n")
    form = await request.post()
    token = str(form.get("csrf", ""))
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not (_same(token, _CSRF_TOKEN) and _same(cookie, _CSRF_TOKEN)):
        log.warning("refused a replay without a valid CSRF token")
        raise web.HTTPForbidden(text="missing or stale CSRF token: reload the page\n")
    if form.get("all") == "1":
        count = await running.store.replay(None)
    else:
        ids = [str(v) for v in form.getall("id", [])]
        if not ids:
            raise web.HTTPBadRequest(text="nothing to replay: give id or all=1\n")
        count = await running.store.replay(ids)
    if count:
        running.deliverer.wake()
    log.info("replayed %d dead letter(s) from the status page", count)
    raise web.HTTPSeeOther(location=f"/?replayed={count}")

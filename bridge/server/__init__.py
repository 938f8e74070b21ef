"""HTTP beside the pipeline: push callbacks enter it (`push.py`), clients submit through it
(`passthrough.py`), operators read it (`page.py`, `probes.py`) behind `server.auth` (`auth.py`).
`serve()` listens with header and body timeouts and a connection cap, and yields its URL.
Handlers take the small protocols of `edge.py`, never the app's internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from bridge.config import ServerConfig
from bridge.server import api, auth, page, passthrough, probes, push
from bridge.server.auth import operator
from bridge.server.edge import EDGE, SERVED, Edge, Live, Served, SourceHandle

__all__ = ["Edge", "Live", "SourceHandle", "build_app", "operator", "serve"]

log = logging.getLogger("bridge.server")

_Handler = auth.Handler


class _AccessLogger(AbstractAccessLogger):
    """One debug line per request: method, route and status, never the path (a pass-through or
    hook path names tasks; a query carries tokens)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.match_info.route.resource if isinstance(request, web.Request) else None
        shown = route.canonical if route is not None else "(no route)"
        self.logger.debug(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            shown,
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


@web.middleware
async def _security_headers(request: web.Request, handler: _Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # Not no-referrer: with it Chromium sends `Origin: null` on the page's own forms.
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def build_app(edge: Edge, config: ServerConfig) -> web.Application:
    app = web.Application(
        client_max_size=push.MAX_BODY, middlewares=[auth.check_host, _security_headers]
    )
    app[EDGE] = edge
    app[SERVED] = Served(config, forwarding=asyncio.Semaphore(config.passthrough.concurrency))
    app[auth.SESSIONS] = auth.Sessions()
    app[push.HOOKS] = push.TaskHooks()
    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    app.router.add_get("/metrics", probes.metrics)
    app.router.add_post("/hooks/{source}", push.hook)
    app.router.add_post("/track/{source}", push.track)
    app.router.add_get("/", page.status_page)
    app.router.add_post("/dlq/replay", page.replay)
    app.router.add_get("/login", page.login_form)
    app.router.add_post("/login", auth.login)
    app.router.add_post("/logout", auth.logout)
    app.router.add_get("/static/style.css", page.stylesheet)
    api.add_routes(app)  # /api/...: events, tasks, dead letters, the OpenAPI document
    passthrough.add_routes(app)  # /mj/... and /{prefix}/mj/..., last: they match widely
    return app


class _Busy(asyncio.Protocol):
    """A connection over `max_connections`: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        transport.close()


class _CappedSite(web.TCPSite):
    """A TCP site that answers connections over the cap with a 503 instead of serving them."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, cap: int) -> None:
        super().__init__(runner, host, port)
        self._cap = cap

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        cap = self._cap

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= cap:
                return _Busy()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            connection, self._host, self._port, reuse_address=True
        )


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve(edge: Edge, config: ServerConfig) -> AsyncIterator[str]:
    """Serve the edge on `config.listen` until the block exits; yields the public URL
    (`public_url`, else the first bound address: port 0 picks a free port)."""
    listen = config.listen
    runner = web.AppRunner(
        build_app(edge, config),
        access_log_class=_AccessLogger,
        access_log=logging.getLogger("bridge.access"),
        shutdown_timeout=2.0,
        # aiohttp closes a connection that has not sent a whole request head within this long,
        # at its start and after each answer: slow headers and idle keep-alives alike.
        keepalive_timeout=config.header_timeout,
        max_field_size=16 * 1024,
    )
    await runner.setup()
    try:
        site = _CappedSite(runner, listen.host, listen.port, config.max_connections)
        await site.start()
        bound = [_url(a) for a in runner.addresses]
        for url in bound:
            every = urlsplit(url).hostname in ("0.0.0.0", "::")
            log.info("listening on %s%s", url, " (every interface)" if every else "")
        served = runner.app[SERVED]
        loopback = next((u for u in bound if "0.0.0.0" not in u and "[::]" not in u), None)
        port = runner.addresses[0][1]
        served.public_url = config.public_url or loopback or f"http://127.0.0.1:{port}"
        names = {"localhost"}
        if listen.host and not listen.everywhere:
            names.add(listen.host.lower())
        if config.public_url and (name := urlsplit(config.public_url).hostname):
            names.add(name.lower())
        served.hosts = frozenset(names)
        if config.insecure and config.auth is None:
            log.warning(
                "server.insecure: anyone who reaches %s can read the status page and replay",
                listen,
            )
        log.info(
            "serving %s: status page, /healthz, /readyz, /metrics, /hooks/SOURCE, /mj/...",
            served.public_url,
        )
        yield served.public_url
    finally:
        await runner.cleanup()

"""Health for process managers and load balancers (`/healthz`, `/readyz`: always open, they say
nothing secret) and Prometheus `/metrics` (behind server.auth when `auth.metrics` says so)."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.server.auth import operator
from bridge.server.edge import EDGE, SERVED, json_answer, live_of
from bridge.sources.health import readiness


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready when every source answers (its last good poll ended within 3 poll intervals, or a
    poll that has not failed is in progress: `readiness`) and the store is not retrying a
    transient error (disk full, locked, connection lost). A long poll never touches /healthz."""
    live = live_of(request)
    now = time.time()
    sources: dict[str, str] = {}
    ready = True
    for name, handle in live.sources.items():
        if not handle.leading:
            sources[name] = "polled by another replica"  # it holds the source's lease
            continue
        config = handle.config
        answering, sources[name] = readiness(
            handle.status,
            failing=handle.failing,
            now=now,
            interval=config.poll_interval,
            timeout=config.timeout,
        )
        ready = ready and answering
    answer: dict[str, object] = {"ready": ready, "sources": sources}
    trouble = live.store.retrier.trouble  # a transient database error is being retried
    if trouble is not None:
        answer["ready"], answer["store"] = False, trouble
    return json_answer(answer, status=200 if answer["ready"] else 503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[EDGE].metrics
    live = live_of(request)
    depth = await live.store.outbox_depth()
    dead = await live.store.dead_count()
    metrics.set_outbox(depth, dead, sorted({*live.config.targets, *depth, *dead}))
    for name, handle in live.sources.items():
        metrics.source_up.labels(name).set(1 if handle.status.up else 0)
    metrics.set_targets(live.targets)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


_guarded_metrics = operator(_metrics)


async def metrics(request: web.Request) -> web.StreamResponse:
    auth = request.app[SERVED].config.auth
    if auth is not None and auth.metrics:
        return await _guarded_metrics(request)
    return await _metrics(request)

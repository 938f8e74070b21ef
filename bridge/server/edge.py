"""What the HTTP edge may ask of the running bridge, as small protocols (the app's `Bridge`,
`Running` and `Watcher` fit them), and the shared pieces of the server's handlers: the app keys,
JSON answers, bounded body reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from bridge.config import Config, ServerConfig, SourceConfig
from bridge.metrics import Metrics, TargetState
from bridge.models import Event
from bridge.sources.health import SourceStatus
from bridge.store import Store


class SourceHandle(Protocol):
    """One running source, as the edge sees it."""

    @property
    def config(self) -> SourceConfig: ...

    @property
    def status(self) -> SourceStatus: ...

    @property
    def leading(self) -> bool: ...

    @property
    def failing(self) -> bool: ...

    async def push(self, tasks: list[dict[str, Any]]) -> list[Event]:
        """A partial snapshot (tasks as the upstream serves them), diffed like a poll."""
        ...

    async def track(self, ids: Iterable[str]) -> list[str]:
        """Follow these task ids; returns the new ones."""
        ...

    async def fetch(self, task_id: str) -> dict[str, Any] | None:
        """The task as the upstream serves it now (None: unknown); raises SourceError."""
        ...


class Live(Protocol):
    """One running configuration."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def sources(self) -> Mapping[str, SourceHandle]: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    @property
    def targets(self) -> Mapping[str, TargetState]:
        """Each target's health, by name."""
        ...

    def wake(self) -> None:
        """Tell the deliverer there is work (after a replay)."""
        ...


class Edge(Protocol):
    """The bridge behind the server: its metrics, and what runs now (None between two
    configurations during a reload)."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def live(self) -> Live | None: ...


@dataclass(slots=True)
class Served:
    """Per server: its configuration, and what is known once it listens."""

    config: ServerConfig
    public_url: str = ""  # set by serve() once bound
    hosts: frozenset[str] = frozenset()  # Host names answered besides IP literals
    forwarding: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    # password checks at once: ~16 MiB and ~50 ms of a core each
    checking: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))


EDGE: web.AppKey[Edge] = web.AppKey("edge")
SERVED: web.AppKey[Served] = web.AppKey("served")


def live_of(request: web.Request) -> Live:
    live = request.app[EDGE].live
    if live is None:  # between two configurations during a reload
        raise web.HTTPServiceUnavailable(text="starting\n")
    return live


def served(request: web.Request) -> Served:
    return request.app[SERVED]


def json_answer(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def refuse(status: int, reason: str) -> web.Response:
    return json_answer({"error": reason}, status=status)


class BodyRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def answer(self) -> web.Response:
        return refuse(self.status, self.reason)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes, within the server's body_timeout; BodyRefused
    (413, 408) otherwise. Counted while reading: a lying or absent Content-Length changes
    nothing."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyRefused(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(served(request).config.body_timeout):
            while chunk := await request.content.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(413, f"body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefused(408, "the body took too long to arrive") from None
    return b"".join(chunks)

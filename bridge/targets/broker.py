"""What the broker targets (NATS JetStream, AMQP, Redis Streams, MQTT) share: one connection per
target, opened on first use and re-opened with backoff after it breaks (`Link`), the CloudEvents
attributes that travel beside the body in binary mode, and what a target does alike
(`BrokerTarget`: the destination's name, the body, digests event by event, closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson

from bridge import topics
from bridge.config import BrokerTargetCommon
from bridge.errors import DeliveryError, Redactor
from bridge.models import OutboxItem, iso
from bridge.topics import Kind

log = logging.getLogger("bridge.targets")

C = TypeVar("C")

RECONNECT_BASE = 0.25  # seconds before the first reconnect; doubles per failure
RECONNECT_CAP = 30.0
STRUCTURED = "application/cloudevents+json; charset=utf-8"
JSON = "application/json"


def safe_url(url: str) -> str:
    """scheme://host:port/path, without user, password or query: for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def attributes(item: OutboxItem) -> dict[str, str]:
    """The event's CloudEvents context attributes as strings (for headers and properties)."""
    event = item.event
    found = {
        "specversion": "1.0",
        "id": event.id,
        "type": event.type,
        "source": f"bridge/{event.source}",
        "subject": event.subject,
        "time": iso(event.time),
    }
    return {k: v for k, v in found.items() if v}


def data_bytes(item: OutboxItem) -> bytes:
    """Binary mode's body: the event's `data` alone, as JSON."""
    return orjson.dumps(item.event.cloudevent()["data"])


class Link(Generic[C]):
    """One connection to a broker. Opened by the first send, kept open, and dropped when a send
    finds it broken; the next send opens a new one, but not before a backoff (0.25 s doubling to
    30 s, jittered) has passed since the last failed attempt: an outage costs one connection
    attempt per backoff, not one per delivery. Sends in the meantime fail fast as retryable."""

    def __init__(
        self,
        name: str,
        config: BrokerTargetCommon,
        open_: Callable[[], Awaitable[C]],
        close: Callable[[C], Awaitable[None]],
    ) -> None:
        self.name = name
        self.where = safe_url(config.url())
        self.redact = Redactor([p for p in (config.password(),) if p])
        self._open = open_
        self._close = close
        self._timeout = config.timeout
        self._conn: C | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._not_before = 0.0
        self._last_error = ""
        self.opened = 0  # connections opened so far (tests and logs)

    def error(self, what: str, exc: BaseException, *, retryable: bool) -> DeliveryError:
        reason = self.redact(str(exc)) or type(exc).__name__
        return DeliveryError(f"{self.name}: {what}: {reason}", retryable=retryable)

    async def get(self) -> C:
        conn = self._conn
        if conn is not None:
            return conn
        async with self._lock:
            if self._conn is not None:
                return self._conn
            wait = self._not_before - time.monotonic()
            if wait > 0:
                raise DeliveryError(
                    f"{self.name}: not connected to {self.where} (next attempt in {wait:.1f}s; "
                    f"last error: {self._last_error})",
                    retryable=True,
                )
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await self._open()
            except Exception as exc:
                self._failures += 1
                delay = min(RECONNECT_CAP, RECONNECT_BASE * 2.0 ** min(self._failures - 1, 16))
                self._not_before = time.monotonic() + random.uniform(delay / 2, delay)
                if isinstance(exc, TimeoutError):
                    self._last_error = f"no answer within {self._timeout:g}s"
                else:
                    self._last_error = self.redact(str(exc)) or type(exc).__name__
                log.warning(
                    "%s: cannot connect to %s (attempt %d): %s",
                    self.name,
                    self.where,
                    self._failures,
                    self._last_error,
                )
                raise DeliveryError(
                    f"{self.name}: cannot connect to {self.where}: {self._last_error}",
                    retryable=True,
                ) from exc
            if self._failures:
                log.info("%s: connected to %s again", self.name, self.where)
            self._failures = 0
            self.opened += 1
            self._conn = conn
            return conn

    async def drop(self, conn: C) -> None:
        """`conn` failed in a way that leaves it unusable: close it; the next get() reconnects."""
        if self._conn is conn:
            self._conn = None
            log.info("%s: connection to %s lost; reconnecting", self.name, self.where)
            await self._quietly_close(conn)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._quietly_close(conn)

    async def _quietly_close(self, conn: C) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self._timeout, 5.0)):
                await self._close(conn)


class BrokerTarget(Generic[C]):
    """The part of a broker target that is the same for every broker: one connection (`link`)
    opened by the subclass's `_connect`, each event one message on it (so a digest group is
    published event by event), its destination named by a template; `send` is the broker's own."""

    def __init__(self, name: str, config: BrokerTargetCommon, destination: str, kind: Kind) -> None:
        self.name = name
        self.binary = config.mode == "binary"  # CloudEvents binary mode: the body is the data
        self._namer = topics.Namer(destination, kind)
        self.link: Link[C] = Link(name, config, self._connect, self._disconnect)

    async def _connect(self) -> C:
        raise NotImplementedError

    async def _disconnect(self, conn: C) -> None:
        raise NotImplementedError

    def destination(self, item: OutboxItem) -> str:
        """The subject, routing key, stream or topic of `item`; a template that cannot name one
        makes a DeliveryError that no retry would fix."""
        try:
            return self._namer(item.event)
        except ValueError as exc:
            raise DeliveryError(f"{self.name}: {exc}", retryable=False) from exc

    def body(self, item: OutboxItem) -> bytes:
        return data_bytes(item) if self.binary else item.payload

    async def send(self, item: OutboxItem) -> None:
        raise NotImplementedError

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        for item in items:
            await self.send(item)

    async def aclose(self) -> None:
        await self.link.aclose()

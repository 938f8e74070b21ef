"""Targets stage, HTTP/1.1 for the webhook hot path: a keep-alive pool of connections to one
origin that sends a request and reads its answer, parsed by httptools (llhttp, Node.js's parser).

Why not aiohttp's client, which every other HTTP part of the bridge uses: a webhook send is one
small POST on a warm connection, and aiohttp's client spends about 55 µs of the event loop on
each (request and response objects, header multidicts, a task per request, timers) where this
spends about 13 (docs/performance.md). Nothing else is different: one request per connection at
a time, answers read to MAX_ANSWER, no redirects followed, TLS verified with the system's CAs.

Reading an answer is bounded like every read of the bridge: its head to MAX_HEAD, its body to
MAX_ANSWER (the rest is never read: the connection is closed), the whole exchange to `timeout`.
A connection that was kept alive and turns out closed before any byte of the answer came (the
server dropped it while idle) is replaced and the request sent once more: a webhook is sent at
least once under one `webhook-id`, so the receiver tells the repeat. A connection unused for
KEEP_IDLE (15 s) is closed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Self

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bridge.config.values import header_problem
from bridge.targets.http import MAX_ANSWER, Answer

MAX_HEAD = 64 * 1024  # the status line and headers of an answer
# An unused connection is closed after this long (aiohttp's keep-alive default too): the receiver
# is not left holding it, and a connection its server has long forgotten is not tried.
KEEP_IDLE = 15.0


class HTTPError(Exception):
    """The exchange failed before a whole answer came: connection refused, reset, closed early,
    or not HTTP: none of these is the target's verdict, so the caller tries again later."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale  # a kept-alive connection found closed before any byte of answer


def check_headers(headers: Iterable[tuple[str, str]]) -> None:
    """Raises ValueError for a header that would break the request: a name that is not a token,
    a CR, LF or NUL in a value."""
    for name, value in headers:
        if problem := header_problem(name, value):
            raise ValueError(problem)


class _Connection(asyncio.Protocol):
    """One connection; one exchange at a time. The answer's callbacks come from the parser."""

    def __init__(self, limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has carried a whole exchange before: a keep-alive connection
        self.idle_since = 0.0  # loop time it went back to the pool
        self._limit = limit
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._received = 0  # bytes of the current answer so far
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._in_body = False

    # -- the exchange ---------------------------------------------------------------------------

    def send(self, data: bytes, waiter: asyncio.Future[Answer]) -> None:
        assert self.transport is not None
        self._waiter, self._received, self._in_body = waiter, 0, False
        self._headers, self._body = [], bytearray()
        self.transport.write(data)

    def abort(self, error: BaseException) -> None:
        """End the exchange with `error` and drop the connection (timeout, cancellation)."""
        self._fail(error)
        self._close()

    def _finish(self, keep: bool) -> None:
        waiter, self._waiter = self._waiter, None
        status = self._parser.get_status_code()
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(status, headers, bytes(self._body)))
        self.used = True
        if not keep:
            self._close()

    def _fail(self, error: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nothing was asked: a broken or hostile server
            self._close()
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # an upgrade too: llhttp pauses on one
            if self._parser.get_status_code() == 101 or isinstance(
                exc, httptools.HttpParserUpgrade
            ):
                self.abort(HTTPError("the target switched protocols (an upgrade nobody asked for)"))
            else:
                self.abort(HTTPError(f"not an HTTP answer ({exc})"))
        else:
            # One read is at most 256 KiB (asyncio's), so a head is never held much past this.
            if self._waiter is not None and not self._in_body and self._received > MAX_HEAD:
                self.abort(HTTPError(f"the answer's head is larger than {MAX_HEAD // 1024} KiB"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        if self._in_body:  # an answer delimited by the end of the connection
            self._finish(keep=False)
            return
        stale = self.used and self._received == 0
        why = f": {exc}" if exc is not None else ""
        self._fail(HTTPError(f"the connection closed before an answer{why}", stale=stale))

    # -- httptools' callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:  # an answer to nothing (a second one to one request)
            self._close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self._parser.get_status_code() >= 200:
            self._in_body = True

    def on_body(self, body: bytes) -> None:
        room = self._limit - len(self._body)
        self._body += body[:room]
        if len(body) >= room:  # enough to judge it; the rest is never read
            self._finish(keep=False)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200 and self._waiter is not None:
            self._headers = []  # 1xx: the real answer follows (101 ends in an upgrade error)
            return
        if self._waiter is not None:
            self._finish(keep=self._parser.should_keep_alive())


class Origin:
    """Keep-alive connections to the scheme, host and port of `url`. As many connections as
    requests in flight at once; idle ones are reused, newest first."""

    def __init__(
        self, url: URL, *, ssl_context: ssl.SSLContext | None = None, limit: int = MAX_ANSWER
    ) -> None:
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"not an http(s) URL: {url.scheme}://...")
        self._host = url.raw_host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.authority = host if url.explicit_port is None else f"{host}:{self._port}"
        self._limit = limit  # of an answer's body
        self._idle: list[_Connection] = []  # oldest first
        self._all: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self,
        head: bytes,
        body: bytes,
        timeout: float,  # noqa: ASYNC109 (one timer per exchange, cheaper than asyncio.timeout)
    ) -> Answer:
        """Send `head` (request line and headers, ending in an empty line) and `body` on a pooled
        connection; the answer, its body to the Origin's `limit`. Raises HTTPError or
        TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            return await self._exchange(loop, head + body, deadline)
        except HTTPError as exc:
            if not exc.stale:
                raise
        return await self._exchange(loop, head + body, deadline, fresh=True)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        data: bytes,
        deadline: float,
        fresh: bool = False,
    ) -> Answer:
        conn = None if fresh else self._take(loop.time())
        if conn is None:
            conn = await self._connect(loop, deadline)
        waiter: asyncio.Future[Answer] = loop.create_future()
        timer = loop.call_at(deadline, conn.abort, TimeoutError())
        try:
            conn.send(data, waiter)
            answer = await waiter
        except BaseException as exc:
            conn.abort(exc)  # cancelled or failed mid-exchange: the connection is unusable
            self._all.discard(conn)
            raise
        finally:
            timer.cancel()
        if conn.closed:
            self._all.discard(conn)
        else:
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep = loop.call_at(conn.idle_since + KEEP_IDLE, self._close_idle, loop)
        return answer

    def _take(self, now: float) -> _Connection | None:
        """The newest idle connection still open, or None."""
        while self._idle:
            conn = self._idle.pop()
            usable = conn.transport is not None and not conn.transport.is_closing()
            if not conn.closed and usable and now - conn.idle_since < KEEP_IDLE:
                return conn
            conn.abort(HTTPError("idle too long"))
            self._all.discard(conn)
        return None

    def _close_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections unused for KEEP_IDLE; look again when the next one will be."""
        self._sweep = None
        now = loop.time()
        while self._idle and (self._idle[0].closed or now - self._idle[0].idle_since >= KEEP_IDLE):
            conn = self._idle.pop(0)
            conn.abort(HTTPError("idle too long"))
            self._all.discard(conn)
        if self._idle:
            self._sweep = loop.call_at(self._idle[0].idle_since + KEEP_IDLE, self._close_idle, loop)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        limit = self._limit
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(limit),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            why = exc.strerror or str(exc) or type(exc).__name__
            raise HTTPError(f"cannot connect to {self.authority}: {why}") from exc
        self._all.add(conn)
        return conn

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.abort(HTTPError("closed"))
        self._all.clear()
        self._idle.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def request_head(
    method: str, target: str, authority: str, headers: Iterable[tuple[str, str]], length: int
) -> bytes:
    """The request line and headers of one request with a body of `length` bytes. The caller
    vouches for the headers (check_headers once for fixed ones; values it made itself)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "\r\n".join(lines).encode()

"""A real local HTTP receiver standing in for webhook, json://, Slack and Discord targets in tests,
and an SMTP one (aiosmtpd) for mailto://. Records every request; answers as scripted.

    async with Receiver() as rx:
        rx.respond(Reply(500), Reply(429, retry_after="1"))   # then 200s
        ...
        requests = await rx.wait_for(3)
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import orjson
from aiohttp import web

from tests.local import LocalServer


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer. `delay` holds the answer back (for timeouts)."""

    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: str | None = None
    delay: float = 0.0


class Receiver(LocalServer):
    """aiohttp server on 127.0.0.1 with a free port. Every request is recorded (GETs of `files`
    too, in `gets`); POST/PUT answers come from the scripted queue for that path, then the queue
    for any path, then `default`."""

    def __init__(self, default: Reply | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.default = default or Reply(200, b"ok")
        self.requests: list[Request] = []
        self.gets: list[Request] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}  # GET path -> a 302 to this Location
        self.active = 0  # requests being answered right now
        self.peak = 0  # the most that were ever answered at once
        self._scripts: dict[str | None, deque[Reply]] = defaultdict(deque)
        self._changed = asyncio.Condition()

    def respond(self, *replies: Reply | int, path: str | None = None) -> None:
        """Queue answers (a bare int is a status) for `path`, or for any path."""
        for r in replies:
            self._scripts[path].append(r if isinstance(r, Reply) else Reply(r))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def wait_for(
        self, count: int, within: float = 10.0, path: str | None = None
    ) -> list[Request]:
        """The first `count` POST/PUT requests (to `path` if given), waiting for them to arrive."""

        def matching() -> list[Request]:
            return [r for r in self.requests if path is None or r.path == path]

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(matching()) >= count)
        return matching()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = Request(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.time(),
        )
        if request.method in ("GET", "HEAD"):
            self.gets.append(record)
            if request.path in self.redirects:
                raise web.HTTPFound(location=self.redirects[request.path])
            if request.path in self.files:
                data, ctype = self.files[request.path]
                return web.Response(body=data, content_type=ctype)
            return web.Response(status=404)
        queue = self._scripts.get(request.path) or self._scripts.get(None)
        reply = queue.popleft() if queue else self.default
        self.requests.append(record)  # on arrival: a test may wait for a request it times out
        async with self._changed:
            self._changed.notify_all()
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
        finally:
            self.active -= 1
        headers = dict(reply.headers)
        if reply.retry_after is not None:
            headers["Retry-After"] = reply.retry_after
        body_bytes = reply.body.encode() if isinstance(reply.body, str) else reply.body
        return web.Response(status=reply.status, body=body_bytes, headers=headers)


class SMTPReceiver:
    """aiosmtpd on 127.0.0.1 with a free port; plain SMTP with AUTH allowed without TLS.
    `messages` holds the parsed mails; `logins` the (user, password) pairs that logged in."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[tuple[str, str]] = []
        self.port = 0
        self._controller: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None

    def start(self) -> None:
        import socket

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        receiver = self
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = BytesParser(policy=default_policy).parsebytes(envelope.content)
                assert isinstance(msg, EmailMessage)
                receiver.messages.append(msg)
                receiver.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                loop, arrived = receiver._loop, receiver._arrived
                assert loop is not None
                assert arrived is not None
                loop.call_soon_threadsafe(arrived.set)
                return "250 Message accepted for delivery"

        def authenticator(
            server: Any, session: Any, envelope: Any, mechanism: str, auth: Any
        ) -> AuthResult:
            if isinstance(auth, LoginPassword):
                receiver.logins.append((auth.login.decode(), auth.password.decode()))
                return AuthResult(success=True)
            return AuthResult(success=False, handled=False)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticator,
            auth_require_tls=False,
            auth_required=False,
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    async def wait_for(self, count: int, within: float = 10.0) -> list[EmailMessage]:
        assert self._arrived is not None
        async with asyncio.timeout(within):
            while len(self.messages) < count:
                self._arrived.clear()
                if len(self.messages) >= count:
                    break
                await self._arrived.wait()
        return self.messages


def make_event(n: int | str, type: str = "task.succeeded", source: str = "mj", **task: Any) -> Any:
    """An Event for outbox tests: task `n`, deterministic id from (source, n, type)."""
    from datetime import UTC, datetime

    from bridge.models import Event, event_id

    body = {"id": str(n), "status": "SUCCESS", "progress": "100%", "prompt": f"cat {n}", **task}
    return Event(
        id=event_id(source, n, type),
        type=type,
        source=source,
        subject=str(n),
        time=datetime.now(UTC),
        task=body,
        previous={"status": "IN_PROGRESS", "progress": "45%"},
    )


def make_delivery(event: Any, target: str, group: str | None = None, rule: str = "r") -> Any:
    from bridge.models import Delivery, delivery_id

    return Delivery(
        id=delivery_id(event.id, target),
        target=target,
        rule=rule,
        event=event,
        title=f"task {event.subject} done",
        body=f"body of {event.subject}",
        group=group,
    )

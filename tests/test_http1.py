"""The webhook target's own HTTP/1.1 connections (bridge/targets/http1.py) against servers that
behave well, badly and hostilely: real sockets on loopback, each server a small script of what
it answers on each connection."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from yarl import URL

from bridge.config import WebhookTargetConfig
from bridge.errors import DeliveryError
from bridge.targets.http1 import Origin, request_head
from bridge.targets.webhook import WebhookTarget
from tests.receiver import Receiver, Reply
from tests.test_webhook import item

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What a scripted server does with one connection: read with `reader`, answer with `writer`.
Script = Callable[["Scripted", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body), or b"" when the client hung up."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


class Scripted:
    """A TCP server on 127.0.0.1 that runs `script` on every connection. `connections` counts
    them, `requests` holds every request read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.ssl: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        request = await read_request(reader)
        if request:
            self.requests.append(request)
        return request

    async def __aenter__(self) -> Scripted:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._open.add(writer)
            try:
                await self.script(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._open.discard(writer)
                writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.ssl)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # the handlers see their connections gone and return

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{port}/hook"


@pytest.fixture
async def made() -> AsyncIterator[Callable[..., WebhookTarget]]:
    """Builds webhook targets and closes their connections after the test."""
    targets: list[WebhookTarget] = []

    def make(url: str, **kw: object) -> WebhookTarget:
        config = WebhookTargetConfig.model_validate({"webhook": url, "timeout": "5s", **kw})
        targets.append(WebhookTarget("hook", config))
        return targets[-1]

    yield make
    for target in targets:
        await target.aclose()


async def keep_alive(
    server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    while await server.read(reader):
        w.write(OK)


async def test_sends_reuse_one_connection(made: Callable[..., WebhookTarget]) -> None:
    async with Scripted(keep_alive) as server:
        hook = made(server.url)
        for n in range(5):
            await hook.send(item(n))
        assert server.connections == 1
        assert len(server.requests) == 5


async def test_concurrent_sends_open_one_connection_each_then_reuse_them(
    made: Callable[..., WebhookTarget],
) -> None:
    async with Scripted(keep_alive) as server:
        hook = made(server.url)
        await asyncio.gather(*(hook.send(item(n)) for n in range(8)))
        assert server.connections <= 8
        opened = server.connections
        await asyncio.gather(*(hook.send(item(n)) for n in range(8, 16)))
        assert server.connections == opened  # all warm: no new connection
        assert len(server.requests) == 16


async def test_the_request_is_what_a_server_expects(made: Callable[..., WebhookTarget]) -> None:
    async with Receiver() as rx:
        hook = made(rx.url + "/hook?tenant=a%20b", headers={"X-Team": "art"})
        sent = item()
        await hook.send(sent)
        [req] = await rx.wait_for(1)
    assert req.path == "/hook"
    assert req.query == {"tenant": "a b"}
    assert req.headers["host"] == rx.url.removeprefix("http://")
    assert req.headers["user-agent"].startswith("mj-bridge/")
    assert req.headers["x-team"] == "art"
    assert req.headers["webhook-id"] == sent.event.id
    assert req.body == sent.payload


async def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(
    made: Callable[..., WebhookTarget],
) -> None:
    async with Receiver() as rx:
        url = rx.url.replace("http://", "http://pipe:s3cr%C3%A9t@") + "/hook"
        await made(url).send(item())
        [req] = await rx.wait_for(1)
        assert (
            req.headers["authorization"]
            == "Basic " + base64.b64encode("pipe:s3cr\u00e9t".encode()).decode()
        )
    with pytest.raises(DeliveryError) as caught:
        await made("http://pipe:s3cret@127.0.0.1:9/hook").send(item())
    assert "s3cret" not in str(caught.value)


async def test_a_kept_connection_the_server_dropped_is_replaced(
    made: Callable[..., WebhookTarget],
) -> None:
    # The server answers the first request on a connection, then drops the connection when
    # the second comes (as one does whose keep-alive timeout ran out as the request left).
    async def once(server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await server.read(reader):
            w.write(OK)
            await w.drain()
        await server.read(reader)

    async with Scripted(once) as server:
        hook = made(server.url)
        await hook.send(item(1))
        await hook.send(item(2))  # sent on the kept connection, dropped, sent again on a new one
        assert server.connections == 2
        assert len(server.requests) == 3  # at least once: the dropped copy was read too
        assert server.requests[1] == server.requests[2]


async def test_an_unused_connection_is_closed_after_a_while(
    made: Callable[..., WebhookTarget], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.targets.http1.KEEP_IDLE", 0.2)
    hung_up = asyncio.Event()

    async def watched(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await keep_alive(server, reader, w)
        hung_up.set()  # the bridge closed it: no request was pending

    async with Scripted(watched) as server:
        hook = made(server.url)
        await hook.send(item(1))
        await asyncio.wait_for(hung_up.wait(), 5)  # closed unasked, about 0.2 s later
        await hook.send(item(2))
        assert server.connections == 2


async def test_a_new_connection_closed_before_an_answer_is_a_retryable_failure(
    made: Callable[..., WebhookTarget],
) -> None:
    async def hang_up(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await server.read(reader)

    async with Scripted(hang_up) as server:
        with pytest.raises(DeliveryError, match="closed before an answer") as caught:
            await made(server.url).send(item())
        assert caught.value.retryable
        assert server.connections == 1  # not tried again at once: the outbox retries later


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * 200_000, "head is larger than 64 KiB"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "switched protocols"),
    ],
    ids=["not-http", "endless-head", "upgrade"],
)
async def test_a_hostile_answer_is_a_clear_retryable_failure(
    made: Callable[..., WebhookTarget], answer: bytes, message: str
) -> None:
    async def hostile(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await server.read(reader)
        w.write(answer)
        await w.drain()
        await reader.read()  # until the bridge hangs up

    async with Scripted(hostile) as server:
        with pytest.raises(DeliveryError, match=message) as caught:
            await made(server.url).send(item())
        assert caught.value.retryable


async def test_an_informational_answer_is_followed_by_the_real_one(
    made: Callable[..., WebhookTarget],
) -> None:
    async def continued(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await server.read(reader)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        w.write(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy")
        await w.drain()

    async with Scripted(continued) as server:
        with pytest.raises(DeliveryError, match="HTTP 503: busy") as caught:
            await made(server.url).send(item())
    assert caught.value.retry_after == 7.0


async def test_answers_framed_by_chunks_or_by_closing_are_read(
    made: Callable[..., WebhookTarget],
) -> None:
    async def chunked(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while await server.read(reader):
            w.write(b"HTTP/1.1 422 No\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"4\r\nbad \r\n5\r\nfield\r\n0\r\n\r\n")

    async def closing(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await server.read(reader)
        w.write(b"HTTP/1.0 500 Oops\r\n\r\nthe body ends with the connection")
        await w.drain()

    async with Scripted(chunked) as server:
        hook = made(server.url)
        for _ in range(2):
            with pytest.raises(DeliveryError, match="HTTP 422: bad field") as caught:
                await hook.send(item())
            assert not caught.value.retryable
        assert server.connections == 1
    async with Scripted(closing) as server:
        with pytest.raises(DeliveryError, match="HTTP 500: the body ends with the connection"):
            await made(server.url).send(item())


async def test_bytes_nobody_asked_for_drop_the_connection(
    made: Callable[..., WebhookTarget],
) -> None:
    async def chatty(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await server.read(reader)
        w.write(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # one answer too many
        await w.drain()
        await reader.read()

    async with Scripted(chatty) as server:
        hook = made(server.url)
        await hook.send(item(1))
        await hook.send(item(2))  # not answered by the stray bytes: on a new connection
        assert server.connections == 2
        assert len(server.requests) == 2


async def test_a_server_that_never_answers_times_out_and_the_connection_is_not_reused(
    made: Callable[..., WebhookTarget],
) -> None:
    async def slow_first(
        server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        if server.connections == 1:
            await server.read(reader)
            await reader.read()  # never answers
        else:
            await keep_alive(server, reader, w)

    async with Scripted(slow_first) as server:
        hook = made(server.url, timeout="200ms")
        started = time.monotonic()
        with pytest.raises(DeliveryError, match=r"timed out after 0\.2s"):
            await hook.send(item(1))
        assert time.monotonic() - started < 3
        await hook.send(item(2))
        assert server.connections == 2


async def test_a_cancelled_send_leaves_no_half_read_connection(
    made: Callable[..., WebhookTarget],
) -> None:
    async def late(server: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await server.read(reader):
            if len(server.requests) == 1:
                await asyncio.sleep(0.3)  # answers the first request after it was given up
            w.write(OK)

    async with Scripted(late) as server:
        hook = made(server.url)
        first = asyncio.create_task(hook.send(item(1)))
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await hook.send(item(2))  # its answer, not the first one's late answer
        assert server.connections == 2


async def test_refused_connection_names_the_origin_not_the_secret(
    made: Callable[..., WebhookTarget],
) -> None:
    with pytest.raises(DeliveryError, match=r"cannot connect to 127\.0\.0\.1:9") as caught:
        await made("http://127.0.0.1:9/hook?token=s3cr3t-token").send(item())
    assert caught.value.retryable
    assert "s3cr3t" not in str(caught.value)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl's command line)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_is_verified(
    made: Callable[..., WebhookTarget], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    scripted = Scripted(keep_alive)
    scripted.ssl = server_side
    async with scripted as server:
        # The system's CAs do not know a self-signed certificate: refused, and said why.
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await made(server.url).send(item())
        assert caught.value.retryable
        # Trusting it, the same server takes the request, twice on one connection.
        trusting = ssl.create_default_context(cafile=str(cert))
        async with Origin(URL(server.url), ssl_context=trusting) as origin:
            for _ in range(2):
                head = request_head("POST", "/hook", origin.authority, [], 2)
                answer = await origin.request(head, b"{}", 5.0)
                assert (answer.status, answer.body) == (200, b"ok")
        assert server.requests[-1].endswith(b"\r\n\r\n{}")
        assert server.connections == 1  # the refused handshake never became a connection


async def test_an_answer_body_is_read_to_its_cap_only(made: Callable[..., WebhookTarget]) -> None:
    async with Receiver(Reply(500, body="x" * 1_000_000)) as rx:
        with pytest.raises(DeliveryError, match=r"HTTP 500: x{10}") as caught:
            await made(rx.url + "/hook").send(item())
    assert caught.value.retryable

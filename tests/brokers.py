"""The real brokers on loopback, seen from a consumer: each `Sink` makes names of its own (a
JetStream stream, an exchange and queue, a stream key, a topic) so runs never meet, gives the
target mapping for rules.yaml, reads back what arrived, and removes what it made.

Without a broker the tests that need it are skipped, unless BRIDGE_REQUIRE_BROKERS=1 (CI), when
they fail. BRIDGE_TEST_NATS, _AMQP, _REDIS and _MQTT override the default URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import aiomqtt
import nats
import nats.js
import pytest
import redis.asyncio

URLS = {
    "nats": os.environ.get("BRIDGE_TEST_NATS") or "nats://127.0.0.1:4222",
    "amqp": os.environ.get("BRIDGE_TEST_AMQP") or "amqp://guest:guest@127.0.0.1:5672/",
    "redis": os.environ.get("BRIDGE_TEST_REDIS") or "redis://127.0.0.1:6379/0",
    "mqtt": os.environ.get("BRIDGE_TEST_MQTT") or "mqtt://127.0.0.1:1883",
}
KINDS = tuple(URLS)


@dataclass(slots=True)
class Received:
    id: str  # the event id as the broker's message carries it (header, property or field)
    body: bytes
    headers: dict[str, str]
    name: str  # the subject, routing key, stream or topic it arrived on


def address(kind: str) -> tuple[str, int]:
    parts = urlsplit(URLS[kind])
    return parts.hostname or "127.0.0.1", parts.port or {"nats": 4222, "amqp": 5672}.get(
        kind, 6379 if kind == "redis" else 1883
    )


def via(kind: str, port: int) -> str:
    """The broker URL with its host:port replaced by 127.0.0.1:port (a proxy in front of it)."""
    parts = urlsplit(URLS[kind])
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


@dataclass
class Sink:
    kind: str
    tag: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:12])
    received: list[Received] = field(default_factory=list)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _queue: aio_pika.abc.AbstractQueue | None = None
    _js: nats.js.JetStreamContext | None = None
    _redis: redis.asyncio.Redis | None = None

    def target(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        """The target mapping for rules.yaml, sending into this sink's own names."""
        url = url or URLS[self.kind]
        match self.kind:
            case "nats":
                base = {"nats": url, "subject": self.tag + ".{{ source }}.{{ type }}"}
            case "amqp":
                base = {"amqp": url, "exchange": self.tag}
            case "redis":
                base = {"redis": url, "stream": self.tag}
            case _:
                base = {"mqtt": url, "topic": self.tag + "/{{ source }}/{{ type }}"}
        return {**base, **extra}

    async def __aenter__(self) -> Sink:
        try:
            async with asyncio.timeout(10):
                await getattr(self, f"_open_{self.kind}")()
        except Exception as exc:
            await self._stack.aclose()
            why = f"no {self.kind} broker at {address(self.kind)}: {type(exc).__name__}: {exc}"
            if os.environ.get("BRIDGE_REQUIRE_BROKERS") == "1":
                pytest.fail(why)
            pytest.skip(why)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    # -- per broker ---------------------------------------------------------------------------

    async def _open_nats(self) -> None:
        nc = await nats.connect(URLS["nats"], allow_reconnect=False)
        self._stack.push_async_callback(nc.close)
        self._js = nc.jetstream()
        await self._js.add_stream(name=self.tag, subjects=[self.tag + ".>"])
        self._stack.push_async_callback(self._js.delete_stream, self.tag)

    async def _open_amqp(self) -> None:
        connection = await aio_pika.connect(URLS["amqp"])
        self._stack.push_async_callback(connection.close)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            self.tag, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._stack.push_async_callback(exchange.delete)
        self._queue = await channel.declare_queue(self.tag, durable=True)
        self._stack.push_async_callback(self._queue.delete, if_unused=False, if_empty=False)
        await self._queue.bind(exchange, "#")
        await self._queue.consume(self._on_amqp, no_ack=True)

    async def _on_amqp(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = {k: str(v) for k, v in (message.headers or {}).items()}
        headers["content-type"] = message.content_type or ""
        self.received.append(
            Received(message.message_id or "", message.body, headers, message.routing_key or "")
        )

    async def _open_redis(self) -> None:
        self._redis = redis.asyncio.Redis.from_url(URLS["redis"])
        self._stack.push_async_callback(self._redis.aclose)
        await self._redis.ping()
        self._stack.push_async_callback(self._forget_redis)

    async def _forget_redis(self) -> None:
        assert self._redis is not None
        keys = [k async for k in self._redis.scan_iter(match=self.tag + "*", count=1000)]
        if keys:
            await self._redis.unlink(*keys)

    async def _open_mqtt(self) -> None:
        host, port = address("mqtt")
        client = aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5)
        await self._stack.enter_async_context(client)
        await client.subscribe(self.tag + "/#", qos=1)
        listening = asyncio.create_task(self._listen(client))

        async def stop() -> None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

        self._stack.push_async_callback(stop)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            user = dict(getattr(message.properties, "UserProperty", []) or [])
            content_type = getattr(message.properties, "ContentType", "")
            payload = message.payload
            body = payload if isinstance(payload, bytes) else str(payload).encode()
            self.received.append(
                Received(
                    user.get("id", ""),
                    body,
                    {**user, "content-type": content_type},
                    str(message.topic),
                )
            )

    # -- reading back -------------------------------------------------------------------------

    async def read(self) -> list[Received]:
        """Everything that arrived so far (for a queue: taken off it and kept here)."""
        match self.kind:
            case "nats":
                assert self._js is not None
                info = await self._js.stream_info(self.tag)
                for seq in range(len(self.received) + 1, info.state.last_seq + 1):
                    msg = await self._js.get_msg(self.tag, seq)
                    headers = dict(msg.headers or {})
                    self.received.append(
                        Received(
                            headers.get("Nats-Msg-Id", ""), msg.data or b"", headers, msg.subject
                        )
                    )
            case "redis":
                assert self._redis is not None
                last = self._last_redis_id if self.received else "-"
                entries = await self._redis.xrange(self.tag, min=last)
                for entry_id, fields in entries:
                    if self.received and entry_id == last:
                        continue
                    text = {k.decode(): v for k, v in fields.items()}
                    headers = {k: v.decode() for k, v in text.items() if k not in ("event", "data")}
                    body = text.get("event", text.get("data", b""))
                    self.received.append(Received(headers.get("id", ""), body, headers, self.tag))
                    self._last_redis_id = entry_id
            case _:
                pass  # AMQP and MQTT: the consumer appends as messages come
        return self.received

    _last_redis_id: Any = "-"

    async def wait_for(self, count: int, within: float = 30.0) -> list[Received]:
        async with asyncio.timeout(within):
            while len(await self.read()) < count:  # noqa: ASYNC110 (polls the broker)
                await asyncio.sleep(0.05)
        return self.received

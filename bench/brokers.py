"""Figure: the broker targets. The same events through the durable outbox (Store + Deliverer + the
nats:/amqp:/redis:/mqtt: target, a temp SQLite file) into each broker on loopback, against that
broker's own Python client publishing the same bodies with the same guarantee (JetStream ack,
publisher confirm, XADD reply, PUBACK) and the same number in flight; beside them the webhook
figure of the same run (bench/delivery.py's contenders), so the four sit next to what users know.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import nats
import redis.asyncio

from bench import Row, fmt_rate
from bench.delivery import CONCURRENCY, bare, fresh, make_events, renamed
from bench.receiver import ReceiverProcess
from bridge.config import Config
from bridge.deliver import Deliverer
from bridge.models import Event, event_json
from bridge.rules import Router
from bridge.store import Store
from bridge.targets import build_target, close_targets

URLS = {
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "redis": "redis://127.0.0.1:6379/0",
    "mqtt": "mqtt://127.0.0.1:1883",
}
CLIENTS = {
    "nats": "nats-py js.publish",
    "amqp": "aio-pika with publisher confirms",
    "redis": "redis-py XADD",
    "mqtt": "aiomqtt QoS 1",
}
NAMES = {"nats": "NATS JetStream", "amqp": "RabbitMQ", "redis": "Redis Streams", "mqtt": "MQTT"}

Publish = Callable[[str, bytes], Awaitable[None]]


@asynccontextmanager
async def broker(kind: str, tag: str) -> AsyncIterator[tuple[dict[str, Any], Publish]]:
    """The target mapping for this bench's own names, and the bare client's publish(id, body)."""
    match kind:
        case "nats":
            nc = await nats.connect(URLS["nats"])
            js = nc.jetstream()
            await js.add_stream(name=tag, subjects=[tag + ".>"])

            async def publish(event_id: str, body: bytes) -> None:
                await js.publish(
                    tag + ".mj.task.succeeded", body, headers={"Nats-Msg-Id": event_id}
                )

            try:
                yield {"nats": URLS["nats"], "subject": tag + ".{{ source }}.{{ type }}"}, publish
            finally:
                await js.delete_stream(tag)
                await nc.close()
        case "amqp":
            connection = await aio_pika.connect(URLS["amqp"])
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                tag, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(tag, durable=True)
            await queue.bind(exchange, "#")

            async def publish(event_id: str, body: bytes) -> None:
                message = aio_pika.Message(
                    body,
                    content_type="application/cloudevents+json; charset=utf-8",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=event_id,
                )
                await exchange.publish(message, "mj.task.succeeded", mandatory=True)

            try:
                yield {"amqp": URLS["amqp"], "exchange": tag}, publish
            finally:
                await queue.delete(if_unused=False, if_empty=False)
                await exchange.delete()
                await connection.close()
        case "redis":
            client = redis.asyncio.Redis.from_url(URLS["redis"])

            async def publish(event_id: str, body: bytes) -> None:
                fields: dict[Any, Any] = {"id": event_id, "event": body}
                await client.xadd(tag, fields, maxlen=100_000, approximate=True)

            try:
                yield {"redis": URLS["redis"], "stream": tag}, publish
            finally:
                keys = [k async for k in client.scan_iter(match=tag + "*", count=1000)]
                if keys:
                    await client.unlink(*keys)
                await client.aclose()
        case _:
            async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as c:
                # As the bridge's target does: no warning for each publish past 10 in flight.
                c.pending_calls_threshold = CONCURRENCY

                async def publish(event_id: str, body: bytes) -> None:
                    await c.publish(tag + "/mj/task.succeeded", body, qos=1)

                yield {"mqtt": URLS["mqtt"], "topic": tag + "/{{ source }}/{{ type }}"}, publish


async def ours(events: list[Event], mapping: dict[str, Any], db: Path) -> float:
    """Seconds from committing the events until every delivery is marked sent."""
    cfg = Config.model_validate(
        {
            "targets": {"rx": {**mapping, "concurrency": CONCURRENCY}},
            "rules": [{"name": "all", "on": ["*"], "to": ["rx"]}],
        }
    )
    deliveries = Router(cfg).route(events, time.time())
    target = build_target("rx", cfg.targets["rx"], None)  # type: ignore[arg-type]
    async with await Store.open(str(db)) as store:
        deliverer = Deliverer(store, {"rx": target}, cfg.targets)
        running = asyncio.create_task(deliverer.run())
        try:
            start = time.perf_counter()
            await store.commit("mj", {}, events, deliveries, progress=deliverer.wake)
            deliverer.wake()
            while deliverer.counts[("rx", "sent")] < len(deliveries):
                await asyncio.sleep(0.002)
                if running.done():
                    running.result()
            await deliverer.drain(10.0)
            elapsed = time.perf_counter() - start
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await close_targets([target])
        if depth := sum((await store.outbox_depth()).values()):
            raise RuntimeError(f"outbox not drained: {depth}")
    return elapsed


async def bare_client(events: list[Event], publish: Publish) -> float:
    """The broker's client alone: the same bodies, CONCURRENCY in flight, no persistence."""
    work = iter([(e.id, event_json(e)) for e in events])

    async def worker() -> None:
        for event_id, body in work:
            await publish(event_id, body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start


async def _measure(count: int, rounds: int) -> dict[str, list[float]]:
    made = await make_events(count)
    rates: dict[str, list[float]] = {}
    tag = "bench" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="bench-brokers-") as tmp:
        async with ReceiverProcess() as rx:
            raw = [event_json(e) for e in made]
            for round_ in range(rounds):
                # The webhook pair of bench/delivery.py, in this run, for the side-by-side row.
                rates.setdefault("webhook", []).append(
                    len(made) / await fresh(renamed(made, f"w{round_}"), rx.url, Path(tmp), round_)
                )
                rates.setdefault("webhook-bare", []).append(len(raw) / await bare(raw, rx.url))
        for kind in URLS:
            async with broker(kind, f"{tag}{kind}") as (mapping, publish):
                for round_ in range(rounds):
                    # New ids each round: NATS and Redis would drop repeats as duplicates.
                    batch = renamed(made, f"{kind}{round_}")
                    db = Path(tmp) / f"{kind}-{round_}.db"
                    rates.setdefault(kind, []).append(len(batch) / await ours(batch, mapping, db))
                    batch = renamed(made, f"{kind}{round_}b")
                    seconds = await bare_client(batch, publish)
                    rates.setdefault(f"{kind}-bare", []).append(len(batch) / seconds)
    return rates


def run(quick: bool = False) -> list[Row]:
    count, rounds = (200, 1) if quick else (2_000, 3)
    measured = asyncio.run(_measure(count, rounds))

    def share(name: str) -> float:
        # Round by round (the two ran seconds apart), then the median, as bench/delivery.py does.
        pairs = zip(measured[name], measured[f"{name}-bare"], strict=True)
        return statistics.median(o / b for o, b in pairs)

    def rate(name: str) -> float:
        return statistics.median(measured[name])

    rows = [
        Row(
            f"Webhook, for comparison: {count:,} events, outbox -> signed webhook vs a bare "
            f"pooled aiohttp client ({CONCURRENCY} in flight each, this run)",
            fmt_rate(rate("webhook")),
            fmt_rate(rate("webhook-bare")),
            f"{share('webhook'):.0%}",
            "—",
            short=f"Webhook, {count:,} events via the outbox, vs bare aiohttp (this run)",
        )
    ]
    for kind in URLS:
        rows.append(
            Row(
                f"{NAMES[kind]}: {count:,} events, outbox -> `{kind}:` target vs "
                f"{CLIENTS[kind]} publishing the same bodies ({CONCURRENCY} in flight each)",
                fmt_rate(rate(kind)),
                fmt_rate(rate(f"{kind}-bare")),
                f"{share(kind):.0%}",
                "—",
                short=f"{NAMES[kind]}, {count:,} events via the outbox, vs {CLIENTS[kind]}",
            )
        )
    return rows

"""The broker targets against the real servers on loopback (tests/brokers.py): what a consumer
receives (body, id, CloudEvents headers), de-duplication where the broker has it, an outage
through a proxy that drops connections (nothing lost, delivery resumes), and failures that say
what to do without a password in them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from bridge.cli import main
from bridge.config import Config
from bridge.deliver import Deliverer
from bridge.diff import TaskState
from bridge.errors import DeliveryError
from bridge.store import OutboxItem, Store
from bridge.targets import Target, build_target, close_targets
from tests.brokers import KINDS, Sink, address, via
from tests.receiver import make_delivery, make_event
from tests.tcp_proxy import TcpProxy

# Where each binding puts the event id in binary mode.
ID_HEADER = {"nats": "ce-id", "amqp": "cloudEvents:id", "redis": "id", "mqtt": "id"}


def target_of(name: str, mapping: dict[str, Any]) -> tuple[Target, Any]:
    config = Config.model_validate({"targets": {name: mapping}}).targets[name]
    return build_target(name, config, None), config  # type: ignore[arg-type]


def item_of(event: Any) -> OutboxItem:
    """An outbox item for target "t" (as the store hands them to a target)."""
    if isinstance(event, int):
        event = make_event(event)
    return OutboxItem(
        id=f"{event.id}:t",
        target="t",
        rule="r",
        title="",
        body="",
        group=None,
        attempts=0,
        created_at=time.time(),
        next_at=0.0,
        last_error=None,
        event=event,
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_send_test_reaches_the_broker(kind: str, tmp_path: Path) -> None:
    async with Sink(kind) as sink:
        rules = tmp_path / "rules.yaml"
        rules.write_text(yaml.safe_dump({"targets": {"t": sink.target()}, "rules": []}))
        assert await asyncio.to_thread(main, ["send-test", "-c", str(rules), "t"]) == 0
        [got] = await sink.wait_for(1)
        event = orjson.loads(got.body)
        # Structured mode: the same CloudEvents JSON a webhook gets, its id where the broker
        # keeps message ids, and the CloudEvents media type.
        assert event["type"] == "bridge.test"
        assert event["specversion"] == "1.0"
        assert got.id == event["id"]
        content_type = got.headers.get("content-type") or got.headers.get("datacontenttype")
        assert content_type == "application/cloudevents+json; charset=utf-8"


@pytest.mark.parametrize("kind", KINDS)
async def test_binary_mode_moves_attributes_beside_the_data(kind: str) -> None:
    async with Sink(kind) as sink:
        target, _ = target_of("t", sink.target(mode="binary"))
        item = item_of(1)
        try:
            await target.send(item)
        finally:
            await close_targets([target])
        [got] = await sink.wait_for(1)
        assert orjson.loads(got.body) == item.event.cloudevent()["data"]
        assert got.headers[ID_HEADER[kind]] == item.event.id
        prefix = ID_HEADER[kind].removesuffix("id")
        assert got.headers[prefix + "type"] == "task.succeeded"
        assert got.headers[prefix + "source"] == "bridge/mj"
        assert got.headers[prefix + "specversion"] == "1.0"


@pytest.mark.parametrize("kind", KINDS)
async def test_sends_in_flight_up_to_concurrency_log_nothing(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # aiomqtt warned "There are N pending publish calls." for every publish past 10 in flight:
    # a target with concurrency 16 filled the log with one line per event.
    caplog.set_level("INFO")
    async with Sink(kind) as sink:
        target, _ = target_of("t", sink.target(concurrency=16))
        try:
            await asyncio.gather(*(target.send(item_of(n)) for n in range(16)))
            await asyncio.gather(*(target.send(item_of(n)) for n in range(16, 32)))
        finally:
            await close_targets([target])
        await sink.wait_for(32)
        # Before the sink's own consumer is cancelled (aio-pika warns of that).
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_a_redelivery_is_dropped_by_the_broker(kind: str) -> None:
    """After a crash the outbox sends again what the broker may already have: NATS drops it in
    the stream's duplicate window (Nats-Msg-Id), Redis by the bridge's NX key (`dedup`)."""
    async with Sink(kind) as sink:
        target, _ = target_of("t", sink.target())
        try:
            for _ in range(3):
                await target.send(item_of(7))
            await target.send(item_of(8))
        finally:
            await close_targets([target])
        await sink.wait_for(2)
        await asyncio.sleep(0.2)
        assert sorted(r.id for r in await sink.read()) == sorted(
            [item_of(7).event.id, item_of(8).event.id]
        )


@pytest.mark.parametrize("kind", KINDS)
async def test_an_outage_loses_nothing_and_delivery_resumes(kind: str, tmp_path: Path) -> None:
    count = 400
    async with Sink(kind) as sink, TcpProxy(*address(kind)) as proxy:
        # 100/s (bursts of 100): the cut lands in the middle however fast the machine is.
        mapping = sink.target(
            via(kind, proxy.port), timeout="2s", max_attempts=1000, rate_limit="100/s"
        )
        config = Config.model_validate({"targets": {"t": mapping}})
        target = build_target("t", config.targets["t"], None)  # type: ignore[arg-type]
        events = [make_event(n) for n in range(count)]
        async with await Store.open(str(tmp_path / "bridge.db")) as store:
            states = {str(n): TaskState("SUCCESS", 100, 1.0, finished=True) for n in range(count)}
            await store.commit("mj", states, events, [make_delivery(e, "t") for e in events])
            deliverer = Deliverer(
                store, {"t": target}, config.targets, backoff_base=0.05, backoff_cap=0.5, idle=0.2
            )
            running = asyncio.create_task(deliverer.run())
            try:
                deliverer.wake()
                async with asyncio.timeout(30):
                    while deliverer.counts[("t", "sent")] < 150:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                proxy.cut()
                async with asyncio.timeout(30):  # the outage is noticed
                    while deliverer.counts[("t", "retry")] == 0:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                assert (await store.outbox_depth()).get("t"), "everything went before the cut"
                await asyncio.sleep(0.5)
                proxy.restore()
                async with asyncio.timeout(90):
                    while await store.outbox_depth():  # noqa: ASYNC110 (the state lives in SQLite)
                        await asyncio.sleep(0.05)
                await deliverer.drain(5.0)
                await running
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                await close_targets([target])
        received = await sink.wait_for(count)
    assert {r.id for r in received} == {e.id for e in events}, "an event was lost"
    assert proxy.accepted >= 2, "delivery resumed on a new connection"
    assert deliverer.counts[("t", "dead")] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_broker_that_does_not_answer_is_retried_without_the_password(kind: str) -> None:
    async with TcpProxy(*address(kind)) as proxy:
        proxy.cut()  # a port that accepts and drops at once, like a broker restarting
        url = via(kind, proxy.port).replace("guest:guest@", "")
        url = url.replace("://", "://mj:hunter2-secret@", 1)
        target, _ = target_of("t", {kind: url, "timeout": "2s"})
        try:
            with pytest.raises(DeliveryError) as first:
                await target.send(item_of(1))
            assert first.value.retryable
            assert "hunter2" not in str(first.value)
            assert "cannot connect" in str(first.value)
            # Right after a failed attempt the next send waits for the backoff, not the broker.
            with pytest.raises(DeliveryError, match="next attempt in") as second:
                await target.send(item_of(2))
            assert second.value.retryable
            assert "hunter2" not in str(second.value)
        finally:
            await close_targets([target])


async def test_nats_without_a_stream_says_so() -> None:
    async with Sink("nats") as sink:
        target, _ = target_of("t", sink.target(subject="nostream" + sink.tag + ".x"))
        try:
            with pytest.raises(DeliveryError, match="no JetStream stream captures") as err:
                await target.send(item_of(1))
            assert err.value.retryable
        finally:
            await close_targets([target])


async def test_amqp_keeps_what_no_queue_is_bound_for() -> None:
    async with Sink("amqp") as sink:
        target, _ = target_of("t", sink.target(exchange=sink.tag + "-unbound"))
        try:
            with pytest.raises(DeliveryError, match="no queue is bound") as err:
                await target.send(item_of(1))
            assert err.value.retryable
            # With mandatory: false the broker may drop it, and the delivery counts as sent.
            target2, _ = target_of(
                "t2", sink.target(exchange=sink.tag + "-unbound", mandatory=False)
            )
            try:
                await target2.send(item_of(1))
            finally:
                await close_targets([target2])
        finally:
            await close_targets([target])
            import aio_pika

            connection = await aio_pika.connect(via("amqp", address("amqp")[1]))
            async with connection:
                channel = await connection.channel()
                await channel.exchange_delete(sink.tag + "-unbound")


async def test_mqtt_retain_keeps_each_tasks_latest_state() -> None:
    import aiomqtt

    async with Sink("mqtt") as sink:
        topic = sink.tag + "/latest/{{ source }}/tasks/{{ subject }}"
        target, _ = target_of("t", sink.target(retain=True, topic=topic))
        started = make_event(5, type="task.started")
        done = make_event(5)
        other = make_event(6)
        host, port = address("mqtt")
        try:
            for event in (started, done, other):
                await target.send(item_of(event))
            # A subscriber that arrives afterwards gets one retained message per task: the last.
            late: dict[str, str] = {}
            async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
                await client.subscribe(sink.tag + "/latest/#", qos=1)
                async with asyncio.timeout(10):
                    async for message in client.messages:
                        body = orjson.loads(message.payload)  # type: ignore[arg-type]
                        late[str(message.topic)] = body["type"]
                        if len(late) == 2:
                            break
                assert late == {
                    sink.tag + "/latest/mj/tasks/5": "task.succeeded",
                    sink.tag + "/latest/mj/tasks/6": "task.succeeded",
                }
                for name in late:  # clear the retained messages
                    await client.publish(name, b"", qos=1, retain=True)
        finally:
            await close_targets([target])

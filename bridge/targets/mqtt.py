"""Target: MQTT 5. Publishes each event to a topic (a template) at QoS 1 (the broker's PUBACK is
the delivery's success), optionally retained: with `retain: true` the default topic is one per
task, so a subscriber arriving late reads each task's latest state. Attributes follow the
CloudEvents MQTT binding (user properties, content type).
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import MqttTargetConfig
from bridge.errors import DeliveryError
from bridge.models import OutboxItem
from bridge.targets.broker import JSON, STRUCTURED, BrokerTarget, attributes


class MqttTarget(BrokerTarget[aiomqtt.Client]):
    def __init__(self, name: str, config: MqttTargetConfig) -> None:
        super().__init__(name, config, config.topic_template, "mqtt")
        self._config = config

    async def _connect(self) -> aiomqtt.Client:
        parts = urlsplit(self._config.mqtt)
        tls = parts.scheme.lower() == "mqtts"
        client = aiomqtt.Client(
            parts.hostname or "localhost",
            parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            # Its own id each time: two bridges (or a reconnect racing the old session) never
            # take each other's session over.
            identifier=f"mj-bridge-{self.name}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self._config.timeout,
            tls_context=ssl.create_default_context() if tls else None,
        )
        # aiomqtt warns "There are N pending publish calls." on every publish past 10 awaiting
        # their PUBACK; the lane keeps `concurrency` in flight by design, so only more is news.
        client.pending_calls_threshold = self._config.concurrency
        await client.__aenter__()
        return client

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        # aiomqtt keeps an unexpected disconnection as a future's exception; read it, or asyncio
        # logs "Future exception was never retrieved" when the client is collected.
        lost = getattr(client, "_disconnected", None)
        if isinstance(lost, asyncio.Future) and lost.done() and not lost.cancelled():
            lost.exception()
        await client.__aexit__(None, None, None)

    def properties(self, item: OutboxItem) -> Properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = JSON if self.binary else STRUCTURED
        # Binary mode: every attribute as a user property under its own name; structured mode may
        # carry them too (the binding allows it), which lets a consumer skip parsing to filter.
        user = list(attributes(item).items())
        if self.binary:
            user.append(("datacontenttype", JSON))
        props.UserProperty = user
        return props

    async def send(self, item: OutboxItem) -> None:
        topic = self.destination(item)
        body = self.body(item)
        client = await self.link.get()
        try:
            await client.publish(
                topic,
                body,
                qos=self._config.qos,
                retain=self._config.retain,
                properties=self.properties(item),
                timeout=self._config.timeout,
            )
        except aiomqtt.MqttCodeError as exc:
            # Not connected any more (the publish could not be queued): reconnect for the next.
            await self.link.drop(client)
            raise self.link.error("publish failed", exc, retryable=True) from exc
        except aiomqtt.MqttError as exc:
            # No PUBACK in time: the connection may be gone without a word (a dead peer).
            await self.link.drop(client)
            raise DeliveryError(
                f"{self.name}: no PUBACK within {self._config.timeout:g}s", retryable=True
            ) from exc

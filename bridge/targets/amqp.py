"""Target: AMQP 0-9-1 (RabbitMQ). Publishes each event to an exchange with a routing key (a
template): persistent, `message_id` = the event id, on a channel with publisher confirms, so the
broker's ack is the delivery's success. Attributes follow the CloudEvents AMQP binding
(`cloudEvents:`-prefixed headers, the application-properties of AMQP 1.0).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions

from bridge.config import AmqpTargetConfig
from bridge.errors import DeliveryError
from bridge.models import OutboxItem
from bridge.targets.broker import JSON, STRUCTURED, BrokerTarget, attributes


@dataclass(slots=True)
class _Channel:
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    exchange: aio_pika.abc.AbstractExchange


class AmqpTarget(BrokerTarget[_Channel]):
    def __init__(self, name: str, config: AmqpTargetConfig) -> None:
        super().__init__(name, config, config.routing_key, "amqp")
        self._config = config

    async def _connect(self) -> _Channel:
        # A plain connection, not connect_robust: the Link reconnects, with backoff, on the next
        # send, and a publish that fails is retried from the outbox rather than replayed here.
        connection = await aio_pika.connect(
            self._config.amqp,
            timeout=self._config.timeout,
            client_properties={"connection_name": f"mj-bridge {self.name}"},
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            cfg = self._config
            if not cfg.exchange:
                exchange = channel.default_exchange
            elif cfg.declare:
                exchange = await channel.declare_exchange(
                    cfg.exchange, aio_pika.ExchangeType(cfg.exchange_type), durable=True
                )
            else:
                exchange = await channel.get_exchange(cfg.exchange, ensure=True)
        except BaseException:
            await connection.close()
            raise
        return _Channel(connection, channel, exchange)

    async def _disconnect(self, link: _Channel) -> None:
        await link.connection.close()

    def message(self, item: OutboxItem) -> aio_pika.Message:
        attrs = attributes(item)
        headers: dict[str, Any] = {f"cloudEvents:{k}": v for k, v in attrs.items()}
        return aio_pika.Message(
            self.body(item),
            content_type=JSON if self.binary else STRUCTURED,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=item.event_id,
            type=attrs.get("type"),
            timestamp=item.event.time,
            app_id="mj-bridge",
            headers=headers,
        )

    async def send(self, item: OutboxItem) -> None:
        key = self.destination(item)
        message = self.message(item)
        link = await self.link.get()
        try:
            await link.exchange.publish(
                message, key, mandatory=self._config.mandatory, timeout=self._config.timeout
            )
        except aio_pika.exceptions.PublishError as exc:
            # Returned: no queue is bound for this key. Kept and retried: bind a queue, or set
            # `mandatory: false` to let the broker drop what no queue wants.
            raise DeliveryError(
                f"{self.name}: no queue is bound to exchange {self._config.exchange!r} for "
                f"routing key {key!r} (the broker returned the message)",
                retryable=True,
            ) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise DeliveryError(
                f"{self.name}: the broker refused the message", retryable=True
            ) from exc
        except TimeoutError as exc:
            if link.channel.is_closed or link.connection.is_closed:
                await self.link.drop(link)
            raise DeliveryError(
                f"{self.name}: no publisher confirm within {self._config.timeout:g}s",
                retryable=True,
            ) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped
            # aiormq cancels the confirms it waits for when its reader dies (connection lost).
            await self.link.drop(link)
            raise DeliveryError(
                f"{self.name}: connection to {self.link.where} lost while publishing",
                retryable=True,
            ) from None
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            # The channel or the connection is gone (also a channel the broker closed over an
            # error, such as an exchange deleted under us): a new one is opened for the next send.
            await self.link.drop(link)
            raise self.link.error("publish failed", exc, retryable=True) from exc

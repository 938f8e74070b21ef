"""Target: NATS JetStream. Publishes each event to a subject (a template) with `Nats-Msg-Id` set
to the event id, so the stream's duplicate window drops a redelivery; the stream's publish ack
is the delivery's success. A stream must capture the subject (docs/brokers.md).
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from bridge.config import NatsTargetConfig
from bridge.errors import DeliveryError
from bridge.models import OutboxItem
from bridge.targets.broker import JSON, STRUCTURED, BrokerTarget, attributes


class NatsTarget(BrokerTarget[Client]):
    def __init__(self, name: str, config: NatsTargetConfig) -> None:
        super().__init__(name, config, config.subject, "nats")
        self._config = config

    async def _connect(self) -> Client:
        async def quiet(exc: Exception) -> None:
            pass  # connection errors reach the delivery as a DeliveryError; nats-py would log

        # nats-py's own reconnect is off: the Link reconnects, with backoff, on the next send.
        nc = Client()
        try:
            await nc.connect(
                servers=[self._config.nats],
                name="mj-bridge",
                allow_reconnect=False,
                connect_timeout=max(1, round(self._config.timeout)),
                error_cb=quiet,
            )
        except BaseException:
            await nc.close()  # a failed first connect leaves its socket open otherwise
            raise
        return nc

    async def _disconnect(self, nc: Client) -> None:
        await nc.close()

    def headers(self, item: OutboxItem) -> dict[str, str]:
        headers = {"Nats-Msg-Id": item.event_id}
        if self.binary:
            headers["content-type"] = JSON
            headers.update({f"ce-{k}": v for k, v in attributes(item).items()})
            headers["ce-datacontenttype"] = JSON
        else:
            headers["content-type"] = STRUCTURED
        return headers

    async def send(self, item: OutboxItem) -> None:
        subject = self.destination(item)
        body = self.body(item)
        nc = await self.link.get()
        js = nc.jetstream(timeout=self._config.timeout)
        try:
            await js.publish(subject, body, headers=self.headers(item))
        except nats.js.errors.NoStreamResponseError as exc:
            raise DeliveryError(
                f"{self.name}: no JetStream stream captures the subject {subject!r} (add one: "
                f"nats stream add --subjects '{subject.split('.')[0]}.>')",
                retryable=True,
            ) from exc
        except nats.js.errors.APIError as exc:
            # 503: JetStream is unavailable for now; other codes (a full stream that refuses new
            # messages, a message over max_payload) will not change by sending again.
            retryable = exc.code is None or exc.code >= 500
            raise self.link.error(
                "JetStream refused the message", exc, retryable=retryable
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise self.link.error("message too large", exc, retryable=False) from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            # No ack in time: sent again later under the same Nats-Msg-Id, so the stream keeps one.
            if not nc.is_connected:
                await self.link.drop(nc)
            raise DeliveryError(
                f"{self.name}: no JetStream ack within {self._config.timeout:g}s", retryable=True
            ) from exc
        except (nats.errors.Error, OSError) as exc:
            await self.link.drop(nc)
            raise self.link.error("publish failed", exc, retryable=True) from exc

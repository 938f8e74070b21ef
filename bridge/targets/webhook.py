"""Target: a signed webhook. POSTs the event as CloudEvents JSON with Standard Webhooks headers
(`webhook-id` is the event id, so a repeat carries the same id) and classifies the answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

import aiohttp
import orjson
from yarl import URL

from bridge.config import WebhookTargetConfig
from bridge.errors import DeliveryError, Redactor
from bridge.models import event_id
from bridge.store import OutboxItem

CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"


def signing_key(secret: str) -> bytes:
    """`whsec_<base64>` -> the decoded bytes (Standard Webhooks); any other string: raw key bytes.
    Raises ValueError for a `whsec_` secret that is not base64."""
    if secret.startswith("whsec_"):
        encoded = secret.removeprefix("whsec_")
        try:
            return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from exc
    return secret.encode()


def sign(key: bytes | hmac.HMAC, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
    `key` may be an HMAC already keyed with it (`hmac.new(key, digestmod=sha256)`): copying that
    is cheaper than keying a new one for every send, and the body is hashed without a copy."""
    mac = key.copy() if isinstance(key, hmac.HMAC) else hmac.new(key, digestmod=hashlib.sha256)
    mac.update(f"{msg_id}.{timestamp}.".encode())
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait: delta-seconds or an HTTP-date; None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify(status: int, headers: Mapping[str, str], detail: str) -> DeliveryError | None:
    """None for 2xx; a retryable error for 5xx and 429; a final one for everything else."""
    if 200 <= status < 300:
        return None
    message = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status >= 500 or status == 429:
        return DeliveryError(
            message, retryable=True, retry_after=retry_after(headers.get("Retry-After"))
        )
    if 300 <= status < 400:
        message += f" (redirect to {headers.get('Location', '?')}; update the webhook URL)"
    return DeliveryError(message, retryable=False)


class WebhookTarget:
    """POSTs CloudEvents JSON, signed when a secret is configured."""

    def __init__(
        self, name: str, config: WebhookTargetConfig, session: aiohttp.ClientSession
    ) -> None:
        self.name = name
        self._url = URL(config.webhook)  # parsed once, not on every send
        self._session = session
        key = signing_key(config.secret) if config.secret else None
        self._key = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None
        self._headers = {**config.headers, "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._redact = Redactor([v for v in (config.secret, *config.headers.values()) if v])

    async def send(self, item: OutboxItem) -> None:
        await self._post(item.event_id, item.payload, "application/json")

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        """One POST of a CloudEvents batch (a JSON array of events). Its `webhook-id` is derived
        from the event ids, so a repeat of the same digest carries the same id."""
        body = orjson.dumps([i.event.cloudevent() for i in items])
        digest_id = event_id("digest", *sorted(i.event.id for i in items))
        await self._post(digest_id, body, CLOUDEVENTS_BATCH)

    async def _post(self, msg_id: str, body: bytes, content_type: str) -> None:
        timestamp = int(time.time())
        headers = {
            **self._headers,
            "content-type": content_type,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                # Read the body even on success so the pooled connection can be reused.
                text = await resp.read()
                if 200 <= resp.status < 300:
                    return
                detail = text[:200].decode("utf-8", "replace").strip()
                error = classify(resp.status, resp.headers, detail)
        except TimeoutError as exc:
            raise DeliveryError(
                f"{self.name}: timed out after {self._timeout.total:g}s", retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            reason = self._redact(str(exc)) or type(exc).__name__
            raise DeliveryError(f"{self.name}: {reason}", retryable=True) from exc
        if error is not None:
            raise DeliveryError(
                f"{self.name}: {self._redact(str(error))}",
                retryable=error.retryable,
                retry_after=error.retry_after,
            )

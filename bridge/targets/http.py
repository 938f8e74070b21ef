"""Targets stage, HTTP: what every target that speaks HTTP shares. One request that turns transport
failures into retryable DeliveryErrors, and one `classify(status, headers)` deciding which answers
are worth another try (Alertmanager's `Retrier.Check`). Each service adds only its quirks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from bridge.errors import DeliveryError

# A target's answer is judged by its status and a small JSON object (Slack's `ok`, Discord's
# message id): no more than this is read of it, however much the service sends.
MAX_ANSWER = 256 * 1024

# Request Timeout, Too Early, Too Many Requests: the service may take the same request later.
RETRYABLE_4XX = frozenset({408, 425, 429})


def retryable_status(status: int) -> bool:
    """5xx, 408, 425 and 429 are worth another try; every other answer is final."""
    return status >= 500 or status in RETRYABLE_4XX


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


def classify(status: int, headers: Mapping[str, str], detail: str = "") -> DeliveryError | None:
    """None for 2xx; else the DeliveryError the answer means: retryable (with the Retry-After
    the service asked for) for 5xx, 408, 425 and 429, final for everything else."""
    if 200 <= status < 300:
        return None
    message = f"HTTP {status}" + (f": {detail}" if detail else "")
    if retryable_status(status):
        return DeliveryError(
            message, retryable=True, retry_after=retry_after(headers.get("Retry-After"))
        )
    if 300 <= status < 400:
        message += f" (redirect to {headers.get('Location', '?')}; update the URL)"
    return DeliveryError(message, retryable=False)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def detail(self, limit: int = 200) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


async def read_answer(resp: aiohttp.ClientResponse, limit: int = MAX_ANSWER) -> bytes:
    """At most `limit` bytes of an answer; the rest is never read (the connection is closed)."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: Any,
    *,
    what: str,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's own per-request timeout)
    redact: Callable[[str], str],
    **kwargs: Any,
) -> Answer:
    """One request, never following redirects; its body is read up to MAX_ANSWER (all of it
    when no larger, so the pooled connection is reused). A timeout or connection failure is a
    retryable DeliveryError naming `what` ("hook: posting"), redacted; any answer, 2xx or not,
    is returned for the caller to judge."""
    try:
        async with session.request(
            method, url, timeout=timeout, allow_redirects=False, **kwargs
        ) as resp:
            return Answer(resp.status, resp.headers, await read_answer(resp))
    except TimeoutError as exc:
        raise DeliveryError(f"{what} timed out after {timeout.total:g}s", retryable=True) from exc
    except aiohttp.ClientError as exc:
        reason = redact(str(exc)) or type(exc).__name__
        raise DeliveryError(f"{what}: {reason}", retryable=True) from exc

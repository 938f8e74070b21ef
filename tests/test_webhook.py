"""Webhook target against a real local receiver: CloudEvents body, Standard Webhooks signature
checked with the independent `standardwebhooks` package, and how answers are classified."""

from __future__ import annotations

import base64
import time
from email.utils import formatdate

import aiohttp
import orjson
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from standardwebhooks.webhooks import Webhook

from bridge.config import WebhookTargetConfig
from bridge.errors import DeliveryError
from bridge.store import OutboxItem
from bridge.targets import WebhookTarget, build_target
from bridge.targets.webhook import ce_header, retry_after
from tests.hostile import EndlessTarget
from tests.receiver import Receiver, Reply, Request, make_event

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def item(n: int = 1) -> OutboxItem:
    event = make_event(n)
    return OutboxItem(
        id=f"{event.id}:hook",
        target="hook",
        rule="r",
        event=event,
        title="t",
        body="b",
        group=None,
        attempts=0,
        created_at=time.time(),
        next_at=time.time(),
        last_error=None,
    )


def target(rx: Receiver, session: aiohttp.ClientSession, **kw: object) -> WebhookTarget:
    config = WebhookTargetConfig.model_validate({"webhook": rx.url + "/hook", **kw})
    built = build_target("hook", config, session)
    assert isinstance(built, WebhookTarget)
    return built


@pytest.mark.parametrize(
    "secret", [SECRET, "a plain shared secret"], ids=["whsec-base64", "plain-raw-bytes"]
)
async def test_signed_cloudevent_verifies_with_standardwebhooks(
    rx: Receiver, session: aiohttp.ClientSession, secret: str
) -> None:
    sent = item()
    hook = target(rx, session, secret=secret, headers={"X-Team": "art"})
    await hook.send(sent)

    [req] = await rx.wait_for(1)
    verifier = Webhook(secret if secret.startswith("whsec_") else secret.encode())
    body = verifier.verify(req.body, req.headers)
    assert body == orjson.loads(orjson.dumps(sent.event.cloudevent()))
    assert body["specversion"] == "1.0"
    assert body["source"] == "bridge/mj"
    assert body["data"]["task"]["status"] == "SUCCESS"
    assert req.headers["webhook-id"] == sent.event.id
    assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 60
    assert req.headers["content-type"] == "application/cloudevents+json"
    assert req.headers["x-team"] == "art"


def _parsed(req: Request) -> BaseCloudEvent:
    """The body as the CloudEvents SDK reads it (binary or structured, by its headers)."""
    return from_http_event(HTTPMessage(headers=dict(req.headers), body=req.body))


async def test_structured_mode_parses_with_the_cloudevents_sdk(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    sent = item()
    await target(rx, session, secret=SECRET).send(sent)
    [req] = await rx.wait_for(1)
    assert req.headers["content-type"] == "application/cloudevents+json"
    event = _parsed(req)
    assert event.get_id() == sent.event.id
    assert event.get_type() == "task.succeeded"
    assert event.get_source() == "bridge/mj"
    assert event.get_subject() == sent.event.subject
    assert event.get_time() == sent.event.time.replace(
        microsecond=sent.event.time.microsecond // 1000 * 1000
    )
    data = event.get_data()
    assert isinstance(data, dict)
    assert data["task"]["status"] == "SUCCESS"


async def test_binary_mode_sends_ce_headers_and_the_data_as_the_body(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    sent = item()
    hook = target(rx, session, secret=SECRET, mode="binary", type_prefix="com.example.mj.")
    await hook.send(sent)
    [req] = await rx.wait_for(1)
    assert req.headers["ce-specversion"] == "1.0"
    assert req.headers["ce-id"] == sent.event.id
    assert req.headers["content-type"] == "application/json"
    event = _parsed(req)
    assert event.get_type() == "com.example.mj.task.succeeded"
    assert event.get_id() == sent.event.id
    assert event.get_source() == "bridge/mj"
    assert event.get_time() == sent.event.time.replace(
        microsecond=sent.event.time.microsecond // 1000 * 1000
    )
    assert event.get_data() == orjson.loads(orjson.dumps(sent.event.cloudevent()["data"]))
    # The signature covers the body (the data) and webhook-id (the event id).
    assert Webhook(SECRET).verify(req.body, req.headers) == event.get_data()


async def test_a_type_prefix_in_structured_mode_and_in_digests(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    hook = target(rx, session, type_prefix="com.example.mj.")
    await hook.send(item(1))
    await hook.send_digest([item(2), item(3)])
    single, digest = await rx.wait_for(2)
    assert _parsed(single).get_type() == "com.example.mj.task.succeeded"
    assert {e["type"] for e in orjson.loads(digest.body)} == {"com.example.mj.task.succeeded"}


def test_a_header_value_outside_printable_ascii_is_percent_encoded() -> None:
    assert ce_header('task 1/ü"%') == "task%201/%C3%BC%22%25"
    assert ce_header("2026-12-01T05:39:54.123Z") == "2026-12-01T05:39:54.123Z"


async def test_a_repeat_carries_the_same_webhook_id(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    hook = target(rx, session, secret=SECRET)
    sent = item()
    await hook.send(sent)
    await hook.send(sent)
    first, second = await rx.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == sent.event.id
    assert first.body == second.body


async def test_wrong_key_does_not_verify(rx: Receiver, session: aiohttp.ClientSession) -> None:
    await target(rx, session, secret=SECRET).send(item())
    [req] = await rx.wait_for(1)
    with pytest.raises(Exception, match="signature"):
        Webhook(base64.b64encode(b"another key").decode()).verify(req.body, req.headers)


async def test_unsigned_without_secret(rx: Receiver, session: aiohttp.ClientSession) -> None:
    await target(rx, session).send(item())
    [req] = await rx.wait_for(1)
    assert "webhook-signature" not in req.headers
    assert req.headers["webhook-id"]


async def test_digest_is_a_cloudevents_batch(rx: Receiver, session: aiohttp.ClientSession) -> None:
    hook = target(rx, session, secret=SECRET)
    items = [item(1), item(2)]
    await hook.send_digest(items)
    await hook.send_digest(list(reversed(items)))
    first, second = await rx.wait_for(2)
    assert first.headers["content-type"] == "application/cloudevents-batch+json"
    batch = Webhook(SECRET).verify(first.body, first.headers)
    assert [e["id"] for e in batch] == [i.event.id for i in items]
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


CASES = [
    (Reply(500, "oops"), True, None, "HTTP 500"),
    (Reply(503, retry_after="7"), True, 7.0, "HTTP 503"),
    (Reply(429, retry_after="2"), True, 2.0, "HTTP 429"),
    (Reply(400, "bad request"), False, None, "HTTP 400: bad request"),
    (Reply(404), False, None, "HTTP 404"),
    (Reply(410), False, None, "HTTP 410"),
    (Reply(301, headers={"Location": "/elsewhere"}), False, None, "redirect"),
]


@pytest.mark.parametrize(
    ("reply", "retryable", "after", "message"),
    CASES,
    ids=["500", "503-retry-after", "429-retry-after", "400", "404", "410", "301"],
)
async def test_answers_are_classified(
    rx: Receiver,
    session: aiohttp.ClientSession,
    reply: Reply,
    retryable: bool,
    after: float | None,
    message: str,
) -> None:
    rx.respond(reply)
    with pytest.raises(DeliveryError, match=message) as info:
        await target(rx, session).send(item())
    assert info.value.retryable is retryable
    assert info.value.retry_after == after


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_accepted(
    rx: Receiver, session: aiohttp.ClientSession, status: int
) -> None:
    rx.respond(status)
    await target(rx, session).send(item())


async def test_timeout_is_retryable(rx: Receiver, session: aiohttp.ClientSession) -> None:
    rx.respond(Reply(200, delay=1.0))
    with pytest.raises(DeliveryError, match="timed out") as info:
        await target(rx, session, timeout="100ms").send(item())
    assert info.value.retryable


async def test_connection_refused_is_retryable(session: aiohttp.ClientSession) -> None:
    config = WebhookTargetConfig(webhook="http://127.0.0.1:9/hook?token=s3cr3t-token")
    with pytest.raises(DeliveryError) as info:
        await WebhookTarget("hook", config).send(item())
    assert info.value.retryable
    assert "s3cr3t" not in str(info.value)


async def test_errors_never_carry_secrets(rx: Receiver, session: aiohttp.ClientSession) -> None:
    # A receiver that echoes what it got must not leak the secret or header values into errors.
    rx.respond(Reply(500, body=f"got key {SECRET} and X-Api-Key: hdr-secret-value"))
    hook = target(rx, session, secret=SECRET, headers={"X-Api-Key": "hdr-secret-value"})
    with pytest.raises(DeliveryError) as info:
        await hook.send(item())
    assert SECRET not in str(info.value)
    assert "hdr-secret-value" not in str(info.value)
    assert "***" in str(info.value)


def test_retry_after_forms() -> None:
    now = time.time()
    assert retry_after("120") == 120.0
    assert retry_after(" 1.5 ") == 1.5
    assert retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after("soon") is None
    assert retry_after(None) is None


async def test_invalid_whsec_secret_is_refused(session: aiohttp.ClientSession) -> None:
    config = WebhookTargetConfig(webhook="http://127.0.0.1:9/", secret="whsec_***not base64***")
    with pytest.raises(ValueError, match="base64"):
        WebhookTarget("hook", config)


@pytest.mark.parametrize(("status", "retryable"), [(200, None), (503, True), (400, False)])
async def test_an_answer_that_never_ends_is_read_only_to_a_small_cap(
    session: aiohttp.ClientSession, status: int, retryable: bool | None
) -> None:
    async with EndlessTarget(status) as endless:
        config = WebhookTargetConfig.model_validate({"webhook": endless.url + "/hook"})
        hook = build_target("hook", config, session)
        if retryable is None:
            await hook.send(item())  # accepted, not a timeout after reading forever
        else:
            with pytest.raises(DeliveryError) as caught:
                await hook.send(item())
            assert caught.value.retryable is retryable
            assert "timed out" not in str(caught.value)
        assert endless.requests == 1

"""Apprise targets against real local servers: json:// and apprise's own Slack and Discord plugins
pointed at a local receiver, mailto:// at a local SMTP server. Checks what really goes out, and
that failures become DeliveryErrors with apprise's reason and no secrets."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from apprise.plugins.discord import NotifyDiscord
from apprise.plugins.slack import NotifySlack

from bridge import logs
from bridge.config import AppriseTargetConfig
from bridge.errors import DeliveryError
from bridge.store import OutboxItem
from bridge.targets import AppriseTarget
from bridge.targets.images import fetch_image, private
from tests.receiver import Receiver, Reply, SMTPReceiver, make_event

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
SLACK_TOKENS = "T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7"
DISCORD = (
    "417429632418316298",
    "JHZ7lQml277CDHmQKMHI8qBe7bk2ZwO5UKjCiOAF7711o33MyZGnbDxeHYJb3hL3bd",
)


def item(n: int = 1, title: str = "IMAGINE done", body: str = "a cat", **task: Any) -> OutboxItem:
    event = make_event(n, **task)
    return OutboxItem(
        id=f"{event.id}:chat",
        target="chat",
        rule="r",
        event=event,
        title=title,
        body=body,
        group=None,
        attempts=0,
        created_at=time.time(),
        next_at=time.time(),
        last_error=None,
    )


def apprise_target(
    url: str, session: aiohttp.ClientSession | None = None, **kw: Any
) -> AppriseTarget:
    return AppriseTarget("chat", AppriseTargetConfig.model_validate({"url": url, **kw}), session)


async def test_json_gets_title_and_body(rx: Receiver) -> None:
    await apprise_target(f"json://127.0.0.1:{rx.port}/notify").send(item())
    [req] = await rx.wait_for(1)
    assert req.path == "/notify"
    payload = req.json()
    assert payload["title"] == "IMAGINE done"
    assert payload["message"] == "a cat"


async def test_failure_carries_apprises_reason_and_is_retryable(rx: Receiver) -> None:
    rx.respond(500)
    target = apprise_target(f"json://bob:hunter22@127.0.0.1:{rx.port}/notify?token=tok-abcdef")
    with pytest.raises(DeliveryError) as info:
        await target.send(item())
    message = str(info.value)
    assert info.value.retryable
    assert "500" in message
    assert "JSON" in message  # what apprise logged, not a bare False
    for secret in ("hunter22", "tok-abcdef", "bob:"):
        assert secret not in message


async def test_4xx_from_the_service_is_not_retryable(rx: Receiver) -> None:
    rx.respond(404)
    with pytest.raises(DeliveryError) as info:
        await apprise_target(f"json://127.0.0.1:{rx.port}/notify").send(item())
    assert not info.value.retryable
    assert "404" in str(info.value)


@pytest.fixture
def bridge_logging() -> Iterator[None]:
    """Lets a test call bridge.logs.setup(), as `bridge run` does; restores logging after."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    named = [logging.getLogger(n) for n in ("", "bridge", *logs.LIBRARIES)]
    levels = [logger.level for logger in named]
    yield
    root.handlers[:] = handlers
    for logger, level in zip(named, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.parametrize("verbosity", [0, 1], ids=["default", "-v"])
@pytest.mark.usefixtures("bridge_logging")
async def test_a_refusal_keeps_its_reason_under_the_bridges_logging(
    rx: Receiver, capsys: pytest.CaptureFixture[str], verbosity: int
) -> None:
    logs.setup("text", verbosity)
    rx.respond(Reply(400, b"no such channel"))
    with pytest.raises(DeliveryError) as info:
        await apprise_target(f"json://127.0.0.1:{rx.port}/notify").send(item())
    message = str(info.value)
    assert "400" in message
    assert "Bad Request" in message
    assert not info.value.retryable  # a dead letter at once, not eight tries
    # The bridge logs the outcome with this reason; apprise's own warning is not printed too.
    assert "Failed to send" not in capsys.readouterr().err


@pytest.mark.usefixtures("bridge_logging")
async def test_the_reason_survives_a_quiet_apprise_logger(rx: Receiver) -> None:
    logging.getLogger("apprise").setLevel(logging.CRITICAL)  # someone else's logging set-up
    rx.respond(400)
    with pytest.raises(DeliveryError, match="400") as info:
        await apprise_target(f"json://127.0.0.1:{rx.port}/notify").send(item())
    assert not info.value.retryable


async def test_unreachable_is_retryable() -> None:
    with pytest.raises(DeliveryError, match="Connection error") as info:
        await apprise_target("json://127.0.0.1:9/notify").send(item())
    assert info.value.retryable


async def test_apprises_own_retry_is_off(rx: Receiver) -> None:
    rx.default = Reply(503)
    with pytest.raises(DeliveryError):
        await apprise_target(f"json://127.0.0.1:{rx.port}/n?retry=3&wait=0").send(item())
    assert len(rx.requests) == 1  # retries belong to the outbox, where they are persisted


async def test_invalid_url_is_a_final_error() -> None:
    target = apprise_target("nosuchservice://user:secretpass@host/path")
    with pytest.raises(DeliveryError, match="not a valid apprise URL") as info:
        await target.send(item())
    assert not info.value.retryable
    assert "secretpass" not in str(info.value)


async def test_attach_image_sends_the_succeeded_tasks_image(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    rx.files["/img/cat.png"] = (PNG, "image/png")
    target = apprise_target(
        f"json://127.0.0.1:{rx.port}/notify",
        session,
        attach_image=True,
        allow_private_images=True,  # the receiver is on loopback
    )
    await target.send(item(imageUrl=f"{rx.url}/img/cat.png"))
    [req] = await rx.wait_for(1)
    [attachment] = req.json()["attachments"]
    assert base64.b64decode(attachment["base64"]) == PNG
    assert attachment["mimetype"] == "image/png"


async def test_attach_image_skips_a_missing_image_but_sends(
    rx: Receiver, session: aiohttp.ClientSession
) -> None:
    target = apprise_target(
        f"json://127.0.0.1:{rx.port}/notify", session, attach_image=True, allow_private_images=True
    )
    await target.send(item(imageUrl=f"{rx.url}/img/gone.png"))
    [req] = await rx.wait_for(1)
    assert not req.json().get("attachments")


async def test_no_attachment_unless_asked_or_succeeded(rx: Receiver) -> None:
    rx.files["/img/cat.png"] = (PNG, "image/png")
    url = f"json://127.0.0.1:{rx.port}/notify"
    await apprise_target(url).send(item(imageUrl=f"{rx.url}/img/cat.png"))
    failed = item(2, status="FAILURE", imageUrl=f"{rx.url}/img/cat.png")
    await apprise_target(url, attach_image=True).send(failed)
    for req in await rx.wait_for(2):
        assert not req.json().get("attachments")
    assert rx.gets == []


@pytest.mark.parametrize(
    ("allow", "path", "host"),
    [
        (False, "/img/cat.png", "127.0.0.1"),  # loopback: refused before any request is made
        (False, "/img/cat.png", "localhost"),  # a name: its resolved addresses are checked
        (True, "/actuator/env", "127.0.0.1"),  # JSON that is no image: never attached
        (True, "/hop/1", "127.0.0.1"),  # four redirects: more than 3
    ],
    ids=["loopback-refused", "name-resolving-to-loopback", "not-an-image", "too-many-redirects"],
)
async def test_attach_image_refuses_what_is_not_a_public_image(
    rx: Receiver, session: aiohttp.ClientSession, allow: bool, path: str, host: str
) -> None:
    rx.files["/img/cat.png"] = (PNG, "image/png")
    rx.files["/actuator/env"] = (b'{"MJ_API_KEY": "k"}', "application/json")
    for hop in range(1, 5):
        rx.redirects[f"/hop/{hop}"] = f"/hop/{hop + 1}"
    rx.redirects["/hop/5"] = "/img/cat.png"
    target = apprise_target(
        f"json://127.0.0.1:{rx.port}/notify", session, attach_image=True, allow_private_images=allow
    )
    await target.send(item(imageUrl=f"http://{host}:{rx.port}{path}"))
    [req] = await rx.wait_for(1)
    assert not req.json().get("attachments")
    assert b"MJ_API_KEY" not in req.body
    if not allow:
        assert rx.gets == []
    else:
        assert "/img/cat.png" not in [g.path for g in rx.gets]


async def test_a_redirect_to_a_refused_address_is_not_followed(
    session: aiohttp.ClientSession,
) -> None:
    """The check runs again after every redirect: 127.0.0.2 stands in for an internal host the
    policy refuses, 127.0.0.1 for the public one that redirects there."""
    async with Receiver() as outside, Receiver(host="127.0.0.2") as inside:
        inside.files["/latest/meta-data"] = (PNG, "image/png")
        outside.redirects["/cat.png"] = f"{inside.url}/latest/meta-data"
        image = await fetch_image(
            session,
            f"{outside.url}/cat.png",
            "cat",
            max_bytes=1 << 20,
            deadline=aiohttp.ClientTimeout(total=5),
            refused=lambda address: str(address) == "127.0.0.2",
        )
        assert image is None
        assert [g.path for g in outside.gets] == ["/cat.png"]
        assert inside.gets == []
        # The same fetch with the inside host allowed gets the image: the refusal was the check.
        image = await fetch_image(
            session,
            f"{outside.url}/cat.png",
            "cat",
            max_bytes=1 << 20,
            deadline=aiohttp.ClientTimeout(total=5),
            refused=lambda address: False,
        )
        assert image is not None
        assert image.data == PNG


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1",
     "fd00:ec2::254", "fe80::1", "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1"],
)  # fmt: skip
def test_private_addresses_are_refused(address: str) -> None:
    assert private(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1::1"])
def test_public_addresses_are_not(address: str) -> None:
    assert not private(ipaddress.ip_address(address))


async def test_digest_is_one_message(rx: Receiver) -> None:
    target = apprise_target(f"json://127.0.0.1:{rx.port}/notify")
    await target.send_digest([item(1, title="cat done"), item(2, title="dog done", body="a dog")])
    [req] = await rx.wait_for(1)
    payload = req.json()
    assert payload["title"].startswith("2 tasks: cat done; dog done")
    assert "a cat" in payload["message"]
    assert "a dog" in payload["message"]


# -- apprise's real Slack and Discord plugins, pointed at the local receiver ----------------------


@pytest.fixture
def local_chat(rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setattr(NotifySlack, "webhook_url", f"{rx.url}/slack/services")
    monkeypatch.setattr(NotifyDiscord, "notify_url", f"{rx.url}/discord/api/webhooks")
    return rx


async def test_slack_webhook_message(local_chat: Receiver) -> None:
    await apprise_target(f"slack://{SLACK_TOKENS}/#renders").send(item())
    [req] = await local_chat.wait_for(1)
    assert req.path == f"/slack/services/{SLACK_TOKENS}"
    payload = req.json()
    assert payload["channel"] == "#renders"
    [attachment] = payload["attachments"]
    assert (attachment["title"], attachment["text"]) == ("IMAGINE done", "a cat")
    assert attachment["footer"] == "mj-bridge"


async def test_slack_refusal_is_final_and_redacted(local_chat: Receiver) -> None:
    local_chat.respond(Reply(404, "no_service"))
    with pytest.raises(DeliveryError) as info:
        await apprise_target(f"slack://{SLACK_TOKENS}/#renders").send(item())
    assert not info.value.retryable
    assert "Slack" in str(info.value)
    assert "TIiajkdnlazkcOXrIdevi7" not in str(info.value)


async def test_discord_message(local_chat: Receiver) -> None:
    await apprise_target(f"discord://{DISCORD[0]}/{DISCORD[1]}").send(item())
    [req] = await local_chat.wait_for(1)
    assert req.path == f"/discord/api/webhooks/{DISCORD[0]}/{DISCORD[1]}"
    assert req.json()["content"].splitlines() == ["IMAGINE done", "a cat"]


async def test_discord_gets_the_image_attached(
    local_chat: Receiver, session: aiohttp.ClientSession
) -> None:
    local_chat.files["/img/cat.png"] = (PNG, "image/png")
    target = apprise_target(
        f"discord://{DISCORD[0]}/{DISCORD[1]}",
        session,
        attach_image=True,
        allow_private_images=True,
    )
    assert target.supports_attachments
    await target.send(item(imageUrl=f"{local_chat.url}/img/cat.png"))
    requests = await local_chat.wait_for(1)
    uploads = [r for r in requests if r.headers["content-type"].startswith("multipart/form-data")]
    assert uploads
    assert PNG in uploads[-1].body


async def test_discord_server_error_is_retryable(local_chat: Receiver) -> None:
    local_chat.default = Reply(500)
    with pytest.raises(DeliveryError) as info:
        await apprise_target(f"discord://{DISCORD[0]}/{DISCORD[1]}").send(item())
    assert info.value.retryable
    assert DISCORD[1] not in str(info.value)


# -- mailto:// to a real SMTP server on loopback ---------------------------------------------------


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPReceiver]:
    server = SMTPReceiver()
    server.start()
    yield server
    server.stop()


async def test_mailto_reaches_the_smtp_server(smtp: SMTPReceiver) -> None:
    url = (
        f"mailto://mailer:s3cret-pw@127.0.0.1:{smtp.port}"
        "?to=oncall@example.com&from=bridge@example.com&mode=insecure"
    )
    await apprise_target(url).send(item(title="IMAGINE failed", body="banned prompt"))
    [msg] = await smtp.wait_for(1)
    assert msg["Subject"] == "IMAGINE failed"
    assert "oncall@example.com" in msg["To"]
    text = msg.get_body(preferencelist=("plain", "html"))
    assert text is not None
    assert "banned prompt" in text.get_content()
    assert smtp.logins == [("mailer", "s3cret-pw")]


async def test_mailto_unreachable_is_retryable_and_redacted() -> None:
    url = "mailto://mailer:s3cret-pw@127.0.0.1:9?to=oncall@example.com&from=b@example.com&mode=insecure"
    with pytest.raises(DeliveryError) as info:
        await apprise_target(url, timeout="2s").send(item())
    assert info.value.retryable
    assert "s3cret-pw" not in str(info.value)


async def test_through_the_deliverer_with_retries(rx: Receiver, tmp_path: Any) -> None:
    from bridge.deliver import Deliverer
    from bridge.store import Store
    from tests.receiver import make_delivery

    config = AppriseTargetConfig(url=f"json://127.0.0.1:{rx.port}/notify", concurrency=3)
    rx.respond(500)
    events = [make_event(n) for n in range(6)]
    async with await Store.open(str(tmp_path / "b.db")) as store:
        await store.commit("mj", {}, events, [make_delivery(e, "chat") for e in events])
        deliverer = Deliverer(
            store, {"chat": AppriseTarget("chat", config)}, {"chat": config}, backoff_base=0.01
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(deliverer.run())
            await rx.wait_for(7)
            await deliverer.drain(2.0)
        assert await store.outbox_depth() == {}
    titles = sorted(r.json()["title"] for r in rx.requests)
    assert len(set(titles)) == 6
    assert deliverer.counts[("chat", "retry")] == 1


LINES = ["IMAGINE failed for task 17", "prompt: a cat <b>on</b> a mat", "reason: banned & blocked"]


@pytest.mark.parametrize("fmt", [None, "text"], ids=["default", "text"])
async def test_mail_keeps_every_line_of_a_text_body(smtp: SMTPReceiver, fmt: str | None) -> None:
    url = (
        f"mailto://127.0.0.1:{smtp.port}?to=oncall@example.com&from=bridge@example.com"
        "&mode=insecure&user=mailer&pass=pw"
    )
    options = {} if fmt is None else {"format": fmt}
    await apprise_target(url, **options).send(item(title="failed", body="\n".join(LINES)))
    [msg] = await smtp.wait_for(1)
    plain = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    parts = [p.get_content() for p in (plain, html) if p is not None]
    assert parts
    for part in parts:
        text = part.replace("<br/>", "\n").replace("<br>", "\n").replace("&lt;", "<")
        text = text.replace("&gt;", ">").replace("&amp;", "&")
        got = [line.strip() for line in text.splitlines()]
        for line in LINES:
            assert line in got, (line, part)


async def test_markdown_format_is_rendered_for_html_mail(smtp: SMTPReceiver) -> None:
    url = f"mailto://127.0.0.1:{smtp.port}?to=o@example.com&from=b@example.com&mode=insecure"
    await apprise_target(url, format="markdown").send(item(title="t", body="**done**\n\nnext"))
    [msg] = await smtp.wait_for(1)
    html = msg.get_body(preferencelist=("html",))
    assert html is not None
    assert "<strong>done</strong>" in html.get_content()

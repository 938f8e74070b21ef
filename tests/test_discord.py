"""Discord target against a local server speaking Discord's webhook API (tests/chat_api.py): one
message per task (POST ?wait=true, then PATCH of that id), never backwards, coalesced edits through
the real outbox, a restart that keeps editing, rate limits, image uploads, refusals, redaction."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.config import Config, DiscordTargetConfig
from bridge.deliver import Deliverer
from bridge.errors import DeliveryError, redact
from bridge.models import Event
from bridge.store import Store
from bridge.targets import DiscordTarget, build_target
from bridge.targets.chat import progress_bar
from tests.chat_api import (
    DISCORD_ID,
    DISCORD_TOKEN,
    Answer,
    ChatAPI,
    delivery,
    outbox_item,
    task_event,
)

HOOK = f"/discord/webhooks/{DISCORD_ID}/{DISCORD_TOKEN}"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(str(tmp_path / "bridge.db")) as s:
        yield s


def config(api: ChatAPI, **kw: Any) -> DiscordTargetConfig:
    return DiscordTargetConfig.model_validate(
        {"discord": api.discord_webhook, "api_base": api.discord_base, **kw}
    )


def discord(
    api: ChatAPI, session: aiohttp.ClientSession, store: Store | None = None, **kw: Any
) -> DiscordTarget:
    kw.setdefault("min_edit_interval", 0)
    kw.setdefault("allow_private_images", True)  # the chat API and its images are on loopback
    target = build_target("art", config(api, **kw), session, store)
    assert isinstance(target, DiscordTarget)
    return target


def embed_of(call: Any) -> dict[str, Any]:
    [embed] = call.payload["embeds"]
    assert isinstance(embed, dict)
    return embed


def fields(embed: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["value"] for f in embed["fields"]}


LIFECYCLE = [
    ("task.submitted", "0%"),
    ("task.started", "0%"),
    ("task.progress", "45%"),
    ("task.succeeded", "100%"),
]


async def test_first_event_posts_with_wait_then_patches_the_same_message(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session)
    for type, progress in LIFECYCLE:
        extra: dict[str, Any] = {
            "finishTime": 1_764_337_483_000,
            "imageUrl": "https://cdn.example/1.png",
        }
        await target.send(outbox_item(task_event(1, type, progress, **extra), "art"))

    post, *patches = api.of("discord")
    assert (post.method, post.path, post.query) == ("POST", HOOK, {"wait": "true"})
    [message_id] = api.discord_messages
    assert [(c.method, c.path, c.query) for c in patches] == [
        ("PATCH", f"{HOOK}/messages/{message_id}", {})
    ] * 3
    assert post.payload["allowed_mentions"] == {"parse": []}
    assert fields(embed_of(post))["Status"] == "📝 Queued"
    assert fields(embed_of(patches[1]))["Progress"] == "▰▰▰▰▱▱▱▱▱▱ 45%"

    final = api.discord_messages[message_id]["embeds"][0]
    assert final["title"] == "✅ IMAGINE succeeded: a lighthouse in a storm --ar 16:9"
    assert final["color"] == 0x57F287
    assert fields(final) == {
        "Action": "IMAGINE",
        "Status": "✅ Succeeded",
        "Took": "1m 23s",
        "Progress": "▰▰▰▰▰▰▰▰▰▰ 100%",
    }
    assert final["image"] == {"url": "https://cdn.example/1.png"}
    assert final["description"] == "a lighthouse in a storm --ar 16:9"
    assert final["footer"] == {"text": "mj · task 1"}
    assert final["timestamp"] == "2026-11-28T13:44:14.000Z"


async def test_failed_task_shows_its_reason_escaped_and_no_bar(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session)
    event = task_event(
        2, "task.failed", "0%", prompt="**big** @everyone", failReason="banned: `nsfw` <@123>"
    )
    await target.send(outbox_item(event, "art"))
    [call] = api.of("discord")
    embed = embed_of(call)
    assert embed["color"] == 0xED4245
    assert embed["description"] == "\\*\\*big\\*\\* @everyone"
    assert fields(embed) == {
        "Action": "IMAGINE",
        "Status": "❌ Failed",
        "Reason": "banned: \\`nsfw\\` \\<@123\\>",
    }
    assert call.payload["allowed_mentions"] == {"parse": []}


async def test_a_message_never_goes_backwards(api: ChatAPI, session: aiohttp.ClientSession) -> None:
    target = discord(api, session)
    await target.send(outbox_item(task_event(3, "task.progress", "60%"), "art"))
    await target.send(outbox_item(task_event(3, "task.progress", "45%"), "art"))  # late
    await target.send(outbox_item(task_event(3, "task.started", "0%"), "art"))  # later still
    await target.send(outbox_item(task_event(3, "task.cancelled", "60%"), "art"))
    await target.send(outbox_item(task_event(3, "task.progress", "90%"), "art"))  # after the end
    await target.send(outbox_item(task_event(3, "task.cancelled", "60%"), "art"))  # a replay
    shown = [fields(embed_of(c)) for c in api.of("discord")]
    assert [f["Status"] for f in shown] == ["⏳ Running", "🚫 Cancelled"]
    assert shown[0]["Progress"] == "▰▰▰▰▰▰▱▱▱▱ 60%"


async def test_updates_within_the_interval_are_deferred_and_the_final_state_is_sent_at_once(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session, min_edit_interval="10s")
    await target.send(outbox_item(task_event(4, "task.started", "0%"), "art"))
    progress = outbox_item(task_event(4, "task.progress", "30%"), "art")
    with pytest.raises(DeliveryError) as deferred:
        await target.send(progress)
    assert deferred.value.retryable
    assert deferred.value.retry_after is not None
    assert 9.0 < deferred.value.retry_after <= 10.0
    assert "coalesced" in str(deferred.value)

    await target.send(outbox_item(task_event(4, "task.succeeded", "100%"), "art"))
    await target.send(progress)  # the deferred update comes back: the final state stays
    assert [c.method for c in api.of("discord")] == ["POST", "PATCH"]
    [message] = api.discord_messages.values()
    assert fields(message["embeds"][0])["Status"] == "✅ Succeeded"


async def test_a_deferral_never_uses_up_the_last_attempts(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session, min_edit_interval="10s", max_attempts=3)
    await target.send(outbox_item(task_event(5, "task.started", "0%"), "art"))
    await target.send(outbox_item(task_event(5, "task.progress", "30%"), "art", attempts=1))
    assert [c.method for c in api.of("discord")] == ["POST", "PATCH"]


async def settled(store: Store, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while await store.outbox_depth():  # noqa: ASYNC110 (the state lives in SQLite)
            await asyncio.sleep(0.02)


async def deliver(
    store: Store, target: DiscordTarget, cfg: DiscordTargetConfig
) -> tuple[Deliverer, asyncio.Task[None]]:
    d = Deliverer(store, {"art": target}, {"art": cfg}, backoff_base=0.01, idle=0.1)
    return d, asyncio.create_task(d.run())


async def test_through_the_outbox_progress_is_coalesced_and_the_newest_state_shown(
    api: ChatAPI, session: aiohttp.ClientSession, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = config(api, min_edit_interval="400ms")  # long enough for a burst to fit in
    d, running = await deliver(store, DiscordTarget("art", cfg, session, store), cfg)
    try:

        async def emit(type: str, progress: str) -> None:
            event = task_event(6, type, progress)
            await store.commit("mj", {}, [event], [delivery(event, "art")])
            d.wake()

        await emit("task.started", "0%")
        await api.wait_for(1, "discord")
        for percent in (15, 30):  # within 400ms of the post: both wait, only 30% is shown
            await emit("task.progress", f"{percent}%")
        await api.wait_for(2, "discord")
        for percent in (60, 75, 90):  # within 400ms of that edit again
            await emit("task.progress", f"{percent}%")
        await api.wait_for(3, "discord")
        await emit("task.succeeded", "100%")
        await api.wait_for(4, "discord")
        await settled(store)
    finally:
        await d.drain(2.0)
        await running

    calls = api.of("discord")
    shown = [fields(embed_of(c)).get("Progress", "") for c in calls]
    # Normally [0%, 30%, 90%, 100%]: each burst waits out the interval and only its newest
    # state is shown. What must hold however slow the machine:
    assert [c.method for c in calls] == ["POST"] + ["PATCH"] * (len(calls) - 1)
    assert len({c.path for c in calls[1:]}) == 1
    assert len(calls) < 7  # fewer messages than states
    percents = [int(s.rsplit(" ", 1)[-1].rstrip("%")) for s in shown]
    assert percents == sorted(set(percents))  # never backwards
    assert percents[-1] == 100
    assert shown[-1] == progress_bar(100)
    # No two edits of unfinished states closer than the interval.
    for before, after in itertools.pairwise(calls[:-1]):
        assert after.at - before.at >= 0.35
    assert await store.dead_letters() == []
    assert d.counts[("art", "sent")] == 7


async def test_a_restart_keeps_editing_the_same_message(
    api: ChatAPI, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = str(tmp_path / "restart.db")
    async with await Store.open(db) as store:
        await discord(api, session, store).send(
            outbox_item(task_event(7, "task.progress", "45%"), "art")
        )
    async with await Store.open(db) as store:  # a new process: new store, new target
        target = discord(api, session, store)
        await target.send(outbox_item(task_event(7, "task.started", "0%"), "art"))  # older
        await target.send(outbox_item(task_event(7, "task.succeeded", "100%"), "art"))
    [message_id] = api.discord_messages
    assert [(c.method, c.path) for c in api.of("discord")] == [
        ("POST", HOOK),
        ("PATCH", f"{HOOK}/messages/{message_id}"),
    ]


async def test_the_interval_holds_across_a_restart(
    api: ChatAPI, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = str(tmp_path / "restart.db")
    async with await Store.open(db) as store:
        await discord(api, session, store, min_edit_interval="1m").send(
            outbox_item(task_event(8, "task.started", "0%"), "art")
        )
    async with await Store.open(db) as store:
        target = discord(api, session, store, min_edit_interval="1m")
        with pytest.raises(DeliveryError, match="coalesced"):
            await target.send(outbox_item(task_event(8, "task.progress", "50%"), "art"))


async def test_a_deleted_message_is_posted_anew(
    api: ChatAPI, session: aiohttp.ClientSession, store: Store
) -> None:
    target = discord(api, session, store)
    await target.send(outbox_item(task_event(9, "task.started", "0%"), "art"))
    [first] = api.discord_messages
    api.discord_messages.clear()  # someone deleted it in the channel
    await target.send(outbox_item(task_event(9, "task.progress", "50%"), "art"))
    await target.send(outbox_item(task_event(9, "task.succeeded", "100%"), "art"))
    [second] = api.discord_messages
    assert second != first
    assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in api.of("discord")] == [
        ("POST", DISCORD_TOKEN),
        ("PATCH", first),
        ("POST", DISCORD_TOKEN),
        ("PATCH", second),
    ]
    assert fields(api.discord_messages[second]["embeds"][0])["Status"] == "✅ Succeeded"


async def test_rate_limit_answer_is_retryable_with_discords_retry_after(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session)
    api.discord_rate_limit(0.25)
    with pytest.raises(DeliveryError) as caught:
        await target.send(outbox_item(task_event(10, "task.started", "0%"), "art"))
    assert caught.value.retryable
    assert caught.value.retry_after == 0.25
    assert "rate limited" in str(caught.value)
    # The bucket is empty for 0.25s: the next send waits for it instead of hitting it again.
    await target.send(outbox_item(task_event(10, "task.started", "0%"), "art"))
    first, second = api.of("discord")
    assert second.at - first.at >= 0.2
    assert len(api.discord_messages) == 1


async def test_an_empty_bucket_is_waited_for(api: ChatAPI, session: aiohttp.ClientSession) -> None:
    target = discord(api, session)
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": "0.2"}
    api.script("discord", Answer(200, {"id": "42"}, headers))
    await target.send(outbox_item(task_event(11, "task.started", "0%"), "art"))
    await target.send(outbox_item(task_event(12, "task.started", "0%"), "art"))
    first, second = api.of("discord")
    assert second.at - first.at >= 0.15


async def test_rate_limited_through_the_outbox_is_sent_once_after_the_pause(
    api: ChatAPI, session: aiohttp.ClientSession, store: Store
) -> None:
    cfg = config(api, min_edit_interval=0)
    d, running = await deliver(store, DiscordTarget("art", cfg, session, store), cfg)
    api.discord_rate_limit(0.1)
    try:
        event = task_event(13, "task.succeeded", "100%")
        await store.commit("mj", {}, [event], [delivery(event, "art")])
        d.wake()
        await api.wait_for(2, "discord")
        await settled(store)
    finally:
        await d.drain(2.0)
        await running
    first, second = api.of("discord")
    assert second.at - first.at >= 0.09
    assert len(api.discord_messages) == 1
    assert d.counts[("art", "retry")] == 1
    assert d.counts[("art", "sent")] == 1


async def test_attach_image_uploads_the_final_image_as_files_0(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    url = api.add_image("grid.png", PNG)
    target = discord(api, session, attach_image=True)
    await target.send(outbox_item(task_event(14, "task.progress", "50%", imageUrl=url), "art"))
    await target.send(outbox_item(task_event(14, "task.succeeded", "100%", imageUrl=url), "art"))
    post, patch = api.of("discord")
    assert embed_of(post)["image"] == {"url": url}  # a preview is linked, not uploaded
    assert patch.headers["content-type"].startswith("multipart/form-data")
    assert patch.payload["attachments"] == [{"id": 0, "filename": "mj-14.png"}]
    assert embed_of(patch)["image"] == {"url": "attachment://mj-14.png"}
    assert patch.files == {"files[0]": ("mj-14.png", "image/png", PNG)}
    [message] = api.discord_messages.values()
    assert message["attachments"][0]["size"] == len(PNG)
    assert api.image_gets == 1


@pytest.mark.parametrize(
    ("name", "limit"),
    [("grid.png", "1KiB"), ("missing.png", "8MiB")],
    ids=["over-max-image-bytes", "not-found"],
)
async def test_an_image_that_cannot_be_had_is_linked_instead(
    api: ChatAPI, session: aiohttp.ClientSession, name: str, limit: str
) -> None:
    api.add_image("grid.png", PNG)
    url = f"{api.url}/images/{name}"
    target = discord(api, session, attach_image=True, max_image_bytes=limit)
    await target.send(outbox_item(task_event(15, "task.succeeded", "100%", imageUrl=url), "art"))
    [call] = api.of("discord")
    assert call.headers["content-type"] == "application/json"
    assert embed_of(call)["image"] == {"url": url}


async def test_refusals_are_final_and_never_show_the_token(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    cfg = DiscordTargetConfig(
        discord=f"https://discord.com/api/webhooks/{DISCORD_ID}/wrong-token-value",
        api_base=api.discord_base,
    )
    with pytest.raises(DeliveryError) as caught:
        await DiscordTarget("art", cfg, session).send(
            outbox_item(task_event(16, "task.started"), "art")
        )
    assert not caught.value.retryable
    assert "HTTP 401: Invalid Webhook Token (code 50027)" in str(caught.value)
    assert "wrong-token-value" not in str(caught.value)


async def test_server_errors_and_unreachable_are_retryable_and_redacted(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session)
    api.script("discord", Answer(502, {"message": "Bad Gateway"}))
    with pytest.raises(DeliveryError) as caught:
        await target.send(outbox_item(task_event(17, "task.started"), "art"))
    assert caught.value.retryable

    cfg = config(api, api_base="http://127.0.0.1:9/api")
    with pytest.raises(DeliveryError) as unreachable:
        await DiscordTarget("art", cfg, session).send(
            outbox_item(task_event(17, "task.started"), "art")
        )
    assert unreachable.value.retryable
    assert DISCORD_TOKEN not in str(unreachable.value)


async def test_source_events_and_digests_post_one_off_messages(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = discord(api, session)
    down = Event(id="evt_down", type="source.down", source="mj", subject="",
                 time=datetime.now(UTC), data={"reason": "unreachable"})  # fmt: skip
    await target.send(outbox_item(down, "art"))
    items = [outbox_item(task_event(n, "task.succeeded", "100%"), "art") for n in (20, 21)]
    await target.send_digest(items)
    note, digest = api.of("discord")
    assert embed_of(note)["title"] == "🔴 source mj is down: unreachable"
    assert embed_of(note)["color"] == 0xED4245
    assert embed_of(digest)["title"].startswith("2 tasks: ✅ IMAGINE succeeded")
    assert note.query == digest.query == {"wait": "true"}


def test_config_shape_secrets_and_redaction(tmp_path: Path) -> None:
    from bridge.config import load_config

    path = tmp_path / "rules.yaml"
    path.write_text(
        "targets:\n"
        "  art:\n"
        "    discord: https://discord.com/api/webhooks/1100/T0KEN-abc?thread_id=77\n"
        "    attach_image: true\n"
        "    max_image_bytes: 25MB\n"
        "rules: [{name: r, to: art}]\n"
    )
    cfg: Config = load_config(path, {})
    art = cfg.targets["art"]
    assert isinstance(art, DiscordTargetConfig)
    assert (art.webhook_id, art.webhook_token, art.thread_id) == ("1100", "T0KEN-abc", "77")
    assert (art.min_edit_interval, art.max_image_bytes) == (2.0, 25_000_000)
    assert art.api_base == "https://discord.com/api/v10"
    assert "T0KEN-abc" in cfg.secrets()
    built = f"{art.api_base}/webhooks/1100/T0KEN-abc/messages/5?thread_id=77"
    assert "T0KEN-abc" not in redact(built)


async def test_thread_id_is_passed_on(api: ChatAPI, session: aiohttp.ClientSession) -> None:
    cfg = DiscordTargetConfig(
        discord=api.discord_webhook + "?thread_id=77", api_base=api.discord_base
    )
    target = DiscordTarget("art", cfg, session)
    await target.send(outbox_item(task_event(22, "task.started"), "art"))
    await target.send(outbox_item(task_event(22, "task.succeeded", "100%"), "art"))
    post, patch = api.of("discord")
    assert post.query == {"wait": "true", "thread_id": "77"}
    assert patch.query == {"thread_id": "77"}


async def test_send_test_posts_one_message(api: ChatAPI, session: aiohttp.ClientSession) -> None:
    from bridge.commands.send_test import send_test

    outcome = await send_test("art", config(api), session)
    assert outcome.startswith("art: accepted the test notification")
    [call] = api.of("discord")
    assert embed_of(call)["title"] == "mj-bridge test notification"
    assert api.discord_messages  # a one-off message, nothing kept to edit

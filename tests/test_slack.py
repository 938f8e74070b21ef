"""Slack target against a local server speaking the Slack Web API subset it uses
(tests/chat_api.py): chat.postMessage then chat.update on the kept ts, the Block Kit layout,
coalescing, a restart that keeps editing, Retry-After, image uploads, refusals and redaction."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.config import SlackTargetConfig, load_config
from bridge.errors import DeliveryError, redact
from bridge.store import Store
from bridge.targets import SlackTarget, build_target
from tests.chat_api import SLACK_TOKEN, Answer, ChatAPI, outbox_item, task_event

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


def slack(
    api: ChatAPI, session: aiohttp.ClientSession, store: Store | None = None, **kw: Any
) -> SlackTarget:
    kw.setdefault("min_edit_interval", 0)
    kw.setdefault("allow_private_images", True)  # the chat API and its images are on loopback
    cfg = SlackTargetConfig.model_validate(
        {"slack": "#mj", "token": SLACK_TOKEN, "api_base": api.slack_base, **kw}
    )
    target = build_target("team", cfg, session, store)
    assert isinstance(target, SlackTarget)
    return target


def fields(blocks: list[dict[str, Any]]) -> dict[str, str]:
    [section] = [b for b in blocks if "fields" in b]
    return dict(f["text"].split("\n", 1) for f in section["fields"])


async def test_post_message_then_update_on_the_kept_ts(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = slack(api, session)
    for type, progress in [("task.started", "0%"), ("task.progress", "45%")]:
        await target.send(outbox_item(task_event(1, type, progress), "team"))
    final = task_event(
        1, "task.succeeded", "100%", finishTime=1_764_337_483_000, imageUrl="https://cdn.x/1.png"
    )
    await target.send(outbox_item(final, "team"))

    post, *updates = api.of("slack")
    [(channel, ts)] = api.slack_messages
    assert post.path == "/slack/chat.postMessage"
    assert post.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
    assert post.headers["content-type"] == "application/json; charset=utf-8"
    assert post.payload["channel"] == "#mj"
    assert (post.payload["unfurl_links"], post.payload["unfurl_media"]) == (False, False)
    assert [(c.path, c.payload["channel"], c.payload["ts"]) for c in updates] == [
        ("/slack/chat.update", channel, ts)
    ] * 2
    assert channel == "C0MJ"  # the id Slack answered with, not the name configured

    message = api.slack_messages[(channel, ts)]
    assert message["text"] == (
        "✅ IMAGINE succeeded: a lighthouse in a storm --ar 16:9 · ✅ Succeeded · ▰▰▰▰▰▰▰▰▰▰ 100%"
    )
    assert message["blocks"] == [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": "✅ IMAGINE succeeded: a lighthouse in a storm --ar 16:9",
            },
        },
        {
            "type": "section",
            "text": {"type": "plain_text", "text": "a lighthouse in a storm --ar 16:9"},
        },
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": "*Action*\nIMAGINE"},
                {"type": "mrkdwn", "text": "*Status*\n✅ Succeeded"},
                {"type": "mrkdwn", "text": "*Progress*\n▰▰▰▰▰▰▰▰▰▰ 100%"},
                {"type": "mrkdwn", "text": "*Took*\n1m 23s"},
            ],
        },
        {
            "type": "image",
            "image_url": "https://cdn.x/1.png",
            "alt_text": "a lighthouse in a storm --ar 16:9",
        },
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "mj · task `1`"}]},
    ]
    progress_blocks = updates[0].payload["blocks"]
    assert fields(progress_blocks)["*Progress*"] == "▰▰▰▰▱▱▱▱▱▱ 45%"


async def test_task_text_cannot_mention_or_link(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = slack(api, session)
    event = task_event(
        2, "task.failed", prompt="<!channel> *big*", failReason="banned <https://x|click> & more"
    )
    await target.send(outbox_item(event, "team"))
    [call] = api.of("slack")
    blocks = call.payload["blocks"]
    assert blocks[1]["text"] == {"type": "plain_text", "text": "<!channel> *big*"}
    assert blocks[3]["text"]["text"] == "*Reason*\nbanned &lt;https://x|click&gt; &amp; more"
    assert fields(blocks) == {"*Action*": "IMAGINE", "*Status*": "❌ Failed"}


async def test_the_notification_text_cannot_ping(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    """Slack notifies with the top-level `text`, read as mrkdwn: a prompt's mentions stay text."""
    target = slack(api, session)
    prompt = "<!here> <@U123> <!subteam^S1> & co"
    await target.send(outbox_item(task_event(3, "task.started", "0%", prompt=prompt), "team"))
    await target.send(outbox_item(task_event(3, "task.failed", "0%", prompt=prompt), "team"))
    note = dataclasses.replace(task_event(4, "source.down"), task=None, subject=None)
    await target.send(outbox_item(note, "team", title="mj down <!channel>"))
    post, update, posted_note = api.of("slack")
    escaped = "&lt;!here&gt; &lt;@U123&gt; &lt;!subteam^S1&gt; &amp; co"
    assert post.payload["text"] == (f"▶️ IMAGINE started: {escaped} · ▶️ Running · ▱▱▱▱▱▱▱▱▱▱ 0%")
    assert update.path == "/slack/chat.update"
    assert update.payload["text"] == f"❌ IMAGINE failed: {escaped} · ❌ Failed"
    assert posted_note.payload["text"].endswith(" mj down &lt;!channel&gt;")


async def test_coalesced_update_waits_and_final_state_goes_at_once(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = slack(api, session, min_edit_interval="30s")
    await target.send(outbox_item(task_event(3, "task.started", "0%"), "team"))
    progress = outbox_item(task_event(3, "task.progress", "50%"), "team")
    with pytest.raises(DeliveryError, match="coalesced") as deferred:
        await target.send(progress)
    assert deferred.value.retryable
    assert deferred.value.retry_after is not None
    assert deferred.value.retry_after > 25
    await target.send(outbox_item(task_event(3, "task.succeeded", "100%"), "team"))
    await target.send(progress)  # comes back later: dropped, the message shows the end
    assert [c.path for c in api.of("slack")] == ["/slack/chat.postMessage", "/slack/chat.update"]


async def test_a_restart_keeps_updating_the_same_message(
    api: ChatAPI, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = str(tmp_path / "bridge.db")
    async with await Store.open(db) as store:
        await slack(api, session, store).send(outbox_item(task_event(4, "task.started"), "team"))
        assert (await store.get_message("team", "mj:4") or "").startswith('{"id":"C0MJ/')
    async with await Store.open(db) as store:
        target = slack(api, session, store)
        await target.send(outbox_item(task_event(4, "task.submitted"), "team"))  # older: dropped
        await target.send(outbox_item(task_event(4, "task.succeeded", "100%"), "team"))
    [(channel, ts)] = api.slack_messages
    post, update = api.of("slack")
    assert post.path == "/slack/chat.postMessage"
    assert (update.path, update.payload["channel"], update.payload["ts"]) == (
        "/slack/chat.update",
        channel,
        ts,
    )


@pytest.mark.parametrize(
    "answer",
    [
        Answer(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "3"}),
        Answer(200, {"ok": False, "error": "ratelimited"}, {"Retry-After": "3"}),
    ],
    ids=["http-429", "ok-false-ratelimited"],
)
async def test_rate_limit_is_retryable_after_retry_after(
    api: ChatAPI, session: aiohttp.ClientSession, answer: Answer
) -> None:
    api.script("slack", answer)
    with pytest.raises(DeliveryError) as caught:
        await slack(api, session).send(outbox_item(task_event(5, "task.started"), "team"))
    assert caught.value.retryable
    assert caught.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("error", "retryable", "hint"),
    [
        ("channel_not_found", False, "check the channel"),
        ("not_in_channel", False, "invite the bot"),
        ("invalid_auth", False, "check the bot token"),
        ("internal_error", True, ""),
    ],
)
async def test_slack_errors_are_classified_and_redacted(
    api: ChatAPI, session: aiohttp.ClientSession, error: str, retryable: bool, hint: str
) -> None:
    api.slack_error(error)
    with pytest.raises(DeliveryError) as caught:
        await slack(api, session).send(outbox_item(task_event(6, "task.started"), "team"))
    assert caught.value.retryable is retryable
    assert f"Slack answered {error}" in str(caught.value)
    assert hint in str(caught.value)
    assert SLACK_TOKEN not in str(caught.value)


async def test_server_error_and_unreachable_are_retryable(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    api.script("slack", Answer(503, {}, {"Retry-After": "2"}))
    with pytest.raises(DeliveryError) as caught:
        await slack(api, session).send(outbox_item(task_event(7, "task.started"), "team"))
    assert (caught.value.retryable, caught.value.retry_after) == (True, 2.0)

    cfg = SlackTargetConfig(slack="#mj", token=SLACK_TOKEN, api_base="http://127.0.0.1:9/api")
    with pytest.raises(DeliveryError) as unreachable:
        await SlackTarget("team", cfg, session).send(
            outbox_item(task_event(7, "task.started"), "team")
        )
    assert unreachable.value.retryable
    assert SLACK_TOKEN not in str(unreachable.value)


async def test_a_deleted_message_is_posted_anew(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    target = slack(api, session)
    await target.send(outbox_item(task_event(8, "task.started"), "team"))
    api.slack_messages.clear()
    await target.send(outbox_item(task_event(8, "task.succeeded", "100%"), "team"))
    assert [c.path for c in api.of("slack")] == [
        "/slack/chat.postMessage",
        "/slack/chat.update",
        "/slack/chat.postMessage",
    ]
    assert len(api.slack_messages) == 1


async def test_attach_image_uploads_it_and_shows_the_slack_file(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    url = api.add_image("grid.png", PNG)
    target = slack(api, session, attach_image=True)
    await target.send(outbox_item(task_event(9, "task.started"), "team"))
    await target.send(outbox_item(task_event(9, "task.succeeded", "100%", imageUrl=url), "team"))

    calls = [(c.service, c.path) for c in api.calls]
    assert calls == [
        ("slack", "/slack/chat.postMessage"),
        ("slack", "/slack/files.getUploadURLExternal"),
        ("upload", calls[2][1]),
        ("slack", "/slack/files.completeUploadExternal"),
        ("slack", "/slack/chat.update"),
    ]
    ticket, upload, complete, update = api.calls[1:]
    assert ticket.form["filename"] == "mj-9.png"
    assert ticket.form["length"] == str(len(PNG))
    assert upload.body == PNG
    assert "authorization" not in upload.headers  # the upload URL is pre-signed
    [file_id] = api.slack_files
    assert orjson.loads(complete.form["files"]) == [
        {"id": file_id, "title": "✅ IMAGINE succeeded: a lighthouse in a storm --ar 16:9"}
    ]
    assert api.slack_files[file_id]["complete"]
    [image] = [b for b in update.payload["blocks"] if b["type"] == "image"]
    assert image == {
        "type": "image",
        "slack_file": {"id": file_id},
        "alt_text": "a lighthouse in a storm --ar 16:9",
    }


async def test_a_failed_upload_links_the_image_instead(
    api: ChatAPI, session: aiohttp.ClientSession
) -> None:
    url = api.add_image("grid.png", PNG)
    api.slack_error("missing_scope")  # no files:write
    target = slack(api, session, attach_image=True)
    await target.send(outbox_item(task_event(10, "task.succeeded", "100%", imageUrl=url), "team"))
    post = api.of("slack")[-1]
    assert post.path == "/slack/chat.postMessage"
    [image] = [b for b in post.payload["blocks"] if b["type"] == "image"]
    assert image["image_url"] == url


def test_config_shape_secrets_and_redaction(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "targets:\n"
        "  team:\n"
        "    slack: '#midjourney'\n"
        "    token: ${SLACK_BOT_TOKEN}\n"
        "    min_edit_interval: 5s\n"
        "rules: [{name: r, to: team}]\n"
    )
    cfg = load_config(path, {"SLACK_BOT_TOKEN": SLACK_TOKEN})
    team = cfg.targets["team"]
    assert isinstance(team, SlackTargetConfig)
    assert (team.slack, team.token, team.min_edit_interval) == ("#midjourney", SLACK_TOKEN, 5.0)
    assert team.api_base == "https://slack.com/api"
    assert SLACK_TOKEN in cfg.secrets()
    assert SLACK_TOKEN not in redact(f"token={SLACK_TOKEN} and bare {SLACK_TOKEN}")


def test_a_slack_target_needs_its_token(tmp_path: Path) -> None:
    from bridge.config import check

    path = tmp_path / "rules.yaml"
    path.write_text("targets:\n  team:\n    slack: '#mj'\n    tokn: x\n")
    problems = [p.message for p in check(path, {})]
    assert problems == [
        "targets.team: missing required key 'token'",
        "targets.team: unknown key 'tokn' (did you mean 'token'?)",
    ]

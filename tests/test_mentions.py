"""No chat message the bridge posts can ping anyone: Discord's one-off messages (source events,
digests) carry only embeds, which never ping, and `allowed_mentions` that parses none."""

from __future__ import annotations

import dataclasses

import aiohttp

from bridge.config import DiscordTargetConfig
from bridge.targets import DiscordTarget, build_target
from tests.chat_api import ChatAPI, outbox_item, task_event


async def test_discord_notes_and_digests_cannot_ping(api: ChatAPI) -> None:
    config = DiscordTargetConfig.model_validate(
        {"discord": api.discord_webhook, "api_base": api.discord_base, "min_edit_interval": 0}
    )
    async with aiohttp.ClientSession() as session:
        target = build_target("art", config, session)
        assert isinstance(target, DiscordTarget)
        down = dataclasses.replace(task_event(1, "source.down"), task=None, subject=None)
        await target.send(outbox_item(down, "art", title="@everyone mj is down <@123>"))
        items = [
            outbox_item(task_event(n, "task.succeeded", "100%"), "art", title=f"@here {n}")
            for n in (2, 3)
        ]
        await target.send_digest(items)
    for call in api.of("discord"):
        assert set(call.payload) == {"embeds", "allowed_mentions"}  # no content, no username
        assert call.payload["allowed_mentions"] == {"parse": []}

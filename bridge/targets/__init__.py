"""The targets stage: where the outbox's deliveries go. One module per kind of target; this module
holds the `Target` seam and picks the implementation with a `match` on the config type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, assert_never

import aiohttp

from bridge.config import (
    AmqpTargetConfig,
    AppriseTargetConfig,
    DiscordTargetConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    RedisTargetConfig,
    SlackTargetConfig,
    TargetConfig,
    WebhookTargetConfig,
)
from bridge.models import OutboxItem
from bridge.targets.discord import DiscordTarget
from bridge.targets.notify import AppriseTarget
from bridge.targets.slack import SlackTarget
from bridge.targets.webhook import WebhookTarget

if TYPE_CHECKING:
    from bridge.roles import MessageRefs


class Target(Protocol):
    """Sends deliveries somewhere. Raises DeliveryError(retryable=..., retry_after=...) when the
    target did not accept; returns only once it did."""

    name: str

    async def send(self, item: OutboxItem) -> None: ...

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        """Several deliveries of one digest group as ONE message."""
        ...


def build_target(
    name: str,
    config: TargetConfig,
    session: aiohttp.ClientSession,
    store: MessageRefs | None = None,
    *,
    private_images: frozenset[str] = frozenset(),
) -> Target:
    """The target for one `targets:` entry. The session is the process's; targets never close it.
    The chat targets keep each task's message id in `store` (so a restart edits the same
    message); without one they remember it in memory only. `private_images` names the sources
    whose image URLs may point at private addresses (their `allow_private_images`)."""
    chat: DiscordTarget | SlackTarget | AppriseTarget
    match config:
        case WebhookTargetConfig():
            return WebhookTarget(name, config)
        case AppriseTargetConfig():
            chat = AppriseTarget(name, config, session)
            chat.private_images = private_images
            return chat
        case DiscordTargetConfig():
            chat = DiscordTarget(name, config, session, store)
            chat.private_images = private_images
            return chat
        case SlackTargetConfig():
            chat = SlackTarget(name, config, session, store)
            chat.private_images = private_images
            return chat
        # The broker clients are imported only when a config uses them.
        case NatsTargetConfig():
            from bridge.targets.jetstream import NatsTarget

            return NatsTarget(name, config)
        case AmqpTargetConfig():
            from bridge.targets.amqp import AmqpTarget

            return AmqpTarget(name, config)
        case RedisTargetConfig():
            from bridge.targets.redis_streams import RedisTarget

            return RedisTarget(name, config)
        case MqttTargetConfig():
            from bridge.targets.mqtt import MqttTarget

            return MqttTarget(name, config)
        case _:
            assert_never(config)


async def close_targets(targets: Iterable[Target]) -> None:
    """Close what targets hold of their own: a broker target's connection, a webhook target's
    keep-alive connections. The other HTTP targets use the process's session."""
    for target in targets:
        aclose = getattr(target, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


__all__ = [
    "AppriseTarget",
    "DiscordTarget",
    "SlackTarget",
    "Target",
    "WebhookTarget",
    "build_target",
    "close_targets",
]

"""The `targets:` section: one model per kind, told apart by its main key (`webhook:`, `discord:`,
`slack:`, the brokers; a bare string or `url:` is apprise).
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    ByteSize,
    Field,
    field_validator,
)

from bridge.config.values import (
    Bool,
    Duration,
    PositiveDuration,
    Rate,
    Strict,
    http_headers,
    http_url,
    url_parts_problem,
)


class TargetCommon(Strict):
    timeout: PositiveDuration = 10.0
    # Retries (docs/delivery.md): the first wait after a failure, doubling up to `backoff_cap`,
    # jittered; a delivery is retried until `max_age` (or `max_attempts`, when set).
    backoff: PositiveDuration = 5.0
    backoff_cap: PositiveDuration = 300.0
    max_attempts: int | None = Field(default=None, ge=1)
    max_age: PositiveDuration = 86400.0
    rate_limit: Rate | None = None
    concurrency: int = Field(default=4, ge=1, le=64)


class AppriseTargetConfig(TargetCommon):
    kind: Literal["apprise"] = "apprise"
    url: str
    attach_image: Bool = False
    max_image_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    allow_private_images: Bool = False  # fetch images from loopback/private/link-local addresses
    # What the rule's title and body are written in; apprise converts it for the service
    # (text becomes HTML with line breaks for mail, for instance).
    format: Literal["text", "markdown", "html"] = "text"


class WebhookTargetConfig(TargetCommon):
    kind: Literal["webhook"] = "webhook"
    webhook: str
    secret: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # CloudEvents HTTP binding: the whole event as the body (structured, the default) or its data
    # as the body and the attributes as ce- headers (binary).
    mode: Literal["structured", "binary"] = "structured"
    # Put before every event type sent: "com.example.mj." makes task.succeeded
    # com.example.mj.task.succeeded (CloudEvents recommends reverse-DNS types).
    type_prefix: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9._:/-]*$")

    _webhook = field_validator("webhook")(http_url)
    _headers = field_validator("headers")(http_headers)


# A Discord webhook URL: https://discord.com/api/webhooks/{id}/{token}, optionally ?thread_id=...
DISCORD_WEBHOOK = re.compile(
    r"^https://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/api(?:/v\d+)?/webhooks/"
    r"(?P<id>\d+)/(?P<token>[A-Za-z0-9_-]+)/?(?:\?(?P<query>[^#]*))?$"
)


def http_base(value: str) -> str:
    return http_url(value).rstrip("/")


class ChatTargetCommon(TargetCommon):
    """What the chat targets share: one message per task, edited in place."""

    min_edit_interval: Duration = 2.0  # at most one edit of a task's message this often
    attach_image: Bool = False  # download the final image and upload it with the message
    max_image_bytes: ByteSize = ByteSize(8 * 1024 * 1024)  # 8MiB; larger images are linked
    allow_private_images: Bool = False  # fetch images from loopback/private/link-local addresses


class DiscordTargetConfig(ChatTargetCommon):
    kind: Literal["discord"] = "discord"
    discord: str  # the channel's webhook URL (Server Settings > Integrations > Webhooks)
    api_base: str = "https://discord.com/api/v10"

    @field_validator("discord")
    @classmethod
    def _webhook_url(cls, value: str) -> str:
        if not DISCORD_WEBHOOK.match(value.strip()):
            # The value is not echoed: it carries the webhook token.
            raise ValueError(
                "must be a Discord webhook URL: https://discord.com/api/webhooks/ID/TOKEN"
            )
        return value.strip()

    _api = field_validator("api_base")(http_base)

    @property
    def webhook_id(self) -> str:
        m = DISCORD_WEBHOOK.match(self.discord)
        assert m is not None  # checked by the validator
        return m["id"]

    @property
    def webhook_token(self) -> str:
        m = DISCORD_WEBHOOK.match(self.discord)
        assert m is not None
        return m["token"]

    @property
    def thread_id(self) -> str | None:
        m = DISCORD_WEBHOOK.match(self.discord)
        query = m["query"] if m else None
        found = re.search(r"(?:^|&)thread_id=(\d+)", query or "")
        return found[1] if found else None


class SlackTargetConfig(ChatTargetCommon):
    kind: Literal["slack"] = "slack"
    slack: str = Field(min_length=1)  # the channel: "#name" or an id such as C0123456789
    token: str = Field(min_length=1)  # a bot token, xoxb-...; needs chat:write (files:write)
    api_base: str = "https://slack.com/api"

    _api = field_validator("api_base")(http_base)


# --- brokers (docs/brokers.md): NATS JetStream, AMQP (RabbitMQ), Redis Streams, MQTT ---------

BROKER_SCHEMES: dict[str, tuple[str, ...]] = {
    "nats": ("nats", "tls"),
    "amqp": ("amqp", "amqps"),
    "redis": ("redis", "rediss"),
    "mqtt": ("mqtt", "mqtts"),
}


def broker_url_problem(value: str, kind: str) -> str | None:
    """Why `value` is not a `kind` broker URL, or None. Never echoes the value (it may carry a
    password)."""
    schemes = BROKER_SCHEMES[kind]
    expected = " or ".join(f"{s}://" for s in schemes)
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/?#]+", value):
        return f"must be a URL such as {schemes[0]}://host"
    parts, problem = url_parts_problem(value)
    if parts is None:
        return problem
    if parts.scheme.lower() not in schemes:
        return f"must start with {expected}"
    if kind == "redis" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "has a database that is not a number (redis://host:6379/0)"
    return None


def _topic_check(kind: Literal["nats", "amqp", "redis", "mqtt"]) -> Any:
    def check(value: str | None) -> str | None:
        from bridge.topics import problem  # templates are compiled on demand

        if value is not None and (why := problem(value, kind)):
            raise ValueError(why)
        return value

    return check


class BrokerTargetCommon(TargetCommon):
    """What the broker targets share: one connection, CloudEvents in structured or binary mode."""

    # structured: the body is the CloudEvents JSON a webhook gets; binary: the body is the event's
    # `data` and its attributes travel as headers/properties (CloudEvents protocol bindings).
    mode: Literal["structured", "binary"] = "structured"

    def url(self) -> str:
        raise NotImplementedError

    def password(self) -> str | None:
        """The secret part of the URL: its password, or a lone user (a NATS/Redis token)."""
        parts = urlsplit(self.url())
        return parts.password or parts.username


class NatsTargetConfig(BrokerTargetCommon):
    kind: Literal["nats"] = "nats"
    nats: str  # nats://[user:pass@|token@]host:4222
    subject: str = "mj.{{ source }}.{{ type }}"

    @field_validator("nats")
    @classmethod
    def _url(cls, value: str) -> str:
        if problem := broker_url_problem(value, "nats"):
            raise ValueError(problem)
        return value

    _subject = field_validator("subject")(_topic_check("nats"))

    def url(self) -> str:
        return self.nats


class AmqpTargetConfig(BrokerTargetCommon):
    kind: Literal["amqp"] = "amqp"
    amqp: str  # amqp://user:pass@host:5672/vhost
    exchange: str = "mj"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    declare: Bool = True  # declare the exchange (durable) on connect; false: it must exist
    routing_key: str = "{{ source }}.{{ type }}"
    # An event no queue is bound for is refused (and retried) instead of dropped by the broker.
    mandatory: Bool = True

    @field_validator("amqp")
    @classmethod
    def _url(cls, value: str) -> str:
        if problem := broker_url_problem(value, "amqp"):
            raise ValueError(problem)
        return value

    _routing_key = field_validator("routing_key")(_topic_check("amqp"))

    def url(self) -> str:
        return self.amqp


class RedisTargetConfig(BrokerTargetCommon):
    kind: Literal["redis"] = "redis"
    redis: str  # redis://[:password@]host:6379/0
    stream: str = "mj:events"
    maxlen: int = Field(default=100_000, ge=0)  # approximate (XADD MAXLEN ~); 0: unbounded
    dedup: Duration = 3600.0  # an event id seen this recently is not added again; 0: off

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str) -> str:
        if problem := broker_url_problem(value, "redis"):
            raise ValueError(problem)
        return value

    _stream = field_validator("stream")(_topic_check("redis"))

    def url(self) -> str:
        return self.redis


class MqttTargetConfig(BrokerTargetCommon):
    kind: Literal["mqtt"] = "mqtt"
    mqtt: str  # mqtt://[user:pass@]host:1883
    topic: str | None = None  # default: mj/{{ source }}/{{ type }}; with retain: one per task
    retain: Bool = False
    qos: Literal[1, 2] = 1

    @field_validator("mqtt")
    @classmethod
    def _url(cls, value: str) -> str:
        if problem := broker_url_problem(value, "mqtt"):
            raise ValueError(problem)
        return value

    _topic = field_validator("topic")(_topic_check("mqtt"))

    def url(self) -> str:
        return self.mqtt

    @property
    def topic_template(self) -> str:
        if self.topic is not None:
            return self.topic
        # Retained messages keep the latest per topic: one topic per task is its latest state.
        return (
            "mj/{{ source }}/tasks/{{ subject }}" if self.retain else "mj/{{ source }}/{{ type }}"
        )


BrokerTargetConfig = NatsTargetConfig | AmqpTargetConfig | RedisTargetConfig | MqttTargetConfig
BROKER_KINDS: tuple[str, ...] = ("nats", "amqp", "redis", "mqtt")


TargetConfig = (
    AppriseTargetConfig
    | WebhookTargetConfig
    | DiscordTargetConfig
    | SlackTargetConfig
    | BrokerTargetConfig
)
TARGET_KINDS: tuple[str, ...] = ("apprise", "webhook", "discord", "slack", *BROKER_KINDS)


def target_kind(value: Any) -> Any:
    """A string is an apprise URL; a mapping is told apart by its main key (`webhook:`,
    `discord:`, `slack:`, `nats:`, `amqp:`, `redis:`, `mqtt:`; else `url:`, apprise)."""
    if isinstance(value, str):
        return {"kind": "apprise", "url": value}
    if isinstance(value, dict) and "kind" not in value:
        for kind in ("webhook", "discord", "slack", *BROKER_KINDS):
            if kind in value:
                return {"kind": kind, **value}
        return {"kind": "apprise", **value}
    return value

"""rules.yaml as pydantic models (unknown keys refused), with durations, rates and booleans read
strictly. Pure: reading the file, `${VAR}` and pointing at lines are the loader's (`load.py`).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from bridge.config.listen import Listen, is_loopback
from bridge.config.passwords import password_problem

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def shown(value: object) -> str:
    """A value quoted for a message, cut short (the loader replaces values from `${VAR}`)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def parse_duration(value: object) -> float:
    """`250ms`, `5s`, `2m`, `1h`, `1d`, or a number of seconds -> seconds."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m[1]) * _UNITS[m[2]]
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        seconds = float(value)  # a bare number of seconds, e.g. from ${POLL:-5}
    if seconds is None and isinstance(value, str):
        raise ValueError(f"{shown(value)} is not a duration such as 250ms, 5s, 2m or 1h")
    if seconds is None:
        raise ValueError("expected a duration such as 250ms, 5s, 2m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative (write one such as 250ms, 5s or 2m)")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite (write one such as 250ms, 5s or 2m)")
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0, such as 250ms, 5s or 2m")
    return seconds


def parse_bool(value: object) -> bool:
    """true or false (YAML 1.2): yes/no/on/off are text, so they are refused rather than guessed;
    the text true/false (from `${VAR:-true}`) is read as the boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, str) and value.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        raise ValueError(
            "write true or false (this file is YAML 1.2, where yes, no, on and off are text)"
        )
    raise ValueError("write true or false")


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(ms|s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


def parse_rate(value: object) -> tuple[int, float]:
    """`30/min` -> (30, 60.0): at most 30 sends per 60 seconds."""
    if isinstance(value, str) and (m := _RATE.match(value)):
        count = int(m[1])
        if count <= 0:
            raise ValueError("a rate needs at least 1 per period")
        return count, _RATE_UNITS[m[2]]
    if isinstance(value, str):
        raise ValueError(f"{shown(value)} is not a rate such as 30/min, 5/s or 100/h")
    raise ValueError("expected a rate such as 30/min, 5/s or 100/h")


def http_url_problem(value: str) -> str | None:
    """Why `value` is not an http(s) URL the bridge can connect to, or None. Never echoes the
    value: it may carry credentials."""
    if not re.match(r"^https?://[^\s/?#]+", value):
        return "must be an http:// or https:// URL"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # urlsplit's own words would quote the URL
        if "IPv6" in str(exc):
            return "has a malformed [IPv6] host (a bracket is missing or misplaced)"
        return "has an invalid port (expected a number from 1 to 65535)"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has an invalid port (expected a number from 1 to 65535)"
    return None


def _http_url(value: str) -> str:
    if problem := http_url_problem(value):
        raise ValueError(problem)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
# Intervals and timeouts where 0 makes no sense (`poll_interval: 0` would poll in a busy loop).
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Bool = Annotated[bool, BeforeValidator(parse_bool)]
Rate = Annotated[tuple[int, float], BeforeValidator(parse_rate)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    base_url: str
    api_key: str | None = None
    # None: detected. The mj-api-secret header first (midjourney-proxy's own; trueai and new-api
    # accept it too), the other schemes tried once on a 401/403 (sources/poll.py).
    auth: Literal["bearer", "mj-api-secret", "raw", "none"] | None = None
    poll_interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 10.0
    backfill: Bool = False
    stall_after: PositiveDuration = 600.0
    push_token: str | None = None
    mode: Literal["auto", "list", "active", "ids"] = "auto"
    full_every: Duration = 60.0
    enrich: list[Literal["seed"]] = Field(default_factory=list)
    # The largest answer read from the upstream, counted while it streams (256MiB: a list of
    # ~100,000 tasks); a larger one fails the poll with reason too_large.
    max_response: ByteSize = Field(default=ByteSize(256 * 1024 * 1024), gt=0)
    # Its tasks' imageUrls may point at loopback/private addresses (a local simulator, a LAN relay).
    allow_private_images: Bool = False

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _http_url(value).rstrip("/")


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

    _webhook = field_validator("webhook")(_http_url)


# A Discord webhook URL: https://discord.com/api/webhooks/{id}/{token}, optionally ?thread_id=...
DISCORD_WEBHOOK = re.compile(
    r"^https://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/api(?:/v\d+)?/webhooks/"
    r"(?P<id>\d+)/(?P<token>[A-Za-z0-9_-]+)/?(?:\?(?P<query>[^#]*))?$"
)


def _api_base(value: str) -> str:
    return _http_url(value).rstrip("/")


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

    _api = field_validator("api_base")(_api_base)

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

    _api = field_validator("api_base")(_api_base)


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
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # urlsplit's own words would quote the URL
        if "IPv6" in str(exc):
            return "has a malformed [IPv6] host (a bracket is missing or misplaced)"
        return "has an invalid port (expected a number from 1 to 65535)"
    if parts.scheme.lower() not in schemes:
        return f"must start with {expected}"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has an invalid port (expected a number from 1 to 65535)"
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


def _target_kind(value: Any) -> Any:
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


class GroupConfig(Strict):
    """A digest, modelled on Alertmanager's grouping (docs/rules.md, "Digests")."""

    by: list[str] = Field(default_factory=lambda: ["source"])  # group_by
    wait: Duration = 30.0  # group_wait: the first event of a quiet group waits this long
    interval: Duration | None = None  # group_interval: at most one message per group this often


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class RuleConfig(Strict):
    name: str
    on: Annotated[list[str], BeforeValidator(_as_list)] = Field(default_factory=lambda: ["*"])
    when: dict[str, Any] = Field(default_factory=dict)
    to: Annotated[list[str], BeforeValidator(_as_list)]
    title: str | None = None
    body: str | None = None
    throttle: Duration | None = None
    group: GroupConfig | None = None
    stop: Bool = False
    cancel: Bool = False


class ServerAuthConfig(Strict):
    """Who may use the operator surfaces (status page, replay, JSON APIs, /metrics if asked)."""

    token: str | None = Field(default=None, min_length=16)  # `Authorization: Bearer TOKEN`
    users: dict[str, str] = Field(default_factory=dict)  # name: hash from `bridge hash-password`
    metrics: Bool = False  # /metrics asks for the token (or a user's session) too

    @field_validator("users")
    @classmethod
    def _hashes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, hashed in value.items():
            if problem := password_problem(hashed):
                raise ValueError(f"user {name!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _something(self) -> ServerAuthConfig:
        if not self.token and not self.users:
            raise ValueError("give a token, users, or both")
        return self


class PassthroughConfig(Strict):
    """The `/mj/...` pass-through: who may call it and how much it carries."""

    # Client credentials besides the source's own api_key (sent as that source's auth scheme,
    # or `Authorization: Bearer TOKEN`); the bridge then calls the upstream with its own key.
    tokens: list[Annotated[str, Field(min_length=16)]] = Field(default_factory=list)
    max_body: ByteSize = ByteSize(64 * 1024 * 1024)  # a submit with base64 images
    max_answer: ByteSize = ByteSize(64 * 1024 * 1024)  # an upstream answer, streamed
    concurrency: int = Field(default=8, ge=1, le=256)  # calls in flight; more wait


class ServerConfig(Strict):
    listen: Listen = Listen.parse("127.0.0.1:8787")
    # The bridge's address as upstreams and browsers reach it: where notifyHooks point and the
    # one Host name (besides IP literals and localhost) the server answers. Default: the bound URL.
    public_url: str | None = None
    insecure: Bool = False  # listen beyond loopback without `auth` (say why in a comment)
    auth: ServerAuthConfig | None = None
    passthrough: PassthroughConfig = Field(default_factory=PassthroughConfig)
    max_connections: int = Field(default=256, ge=1)
    header_timeout: PositiveDuration = 10.0  # a request head (and an idle keep-alive connection)
    body_timeout: PositiveDuration = 30.0  # reading a request body

    _public = field_validator("public_url")(lambda v: None if v is None else _api_base(v))

    @model_validator(mode="after")
    def _protected(self) -> ServerConfig:
        if self.auth is None and not self.insecure and not is_loopback(self.listen.host):
            raise ValueError(
                f"server.listen {self.listen} reaches beyond this machine, and there is no "
                "server.auth: anyone on the network could read the status page and replay. "
                "Add server.auth (a token or users), listen on 127.0.0.1, or say insecure: true"
            )
        return self


class Config(Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    targets: dict[
        str,
        Annotated[TargetConfig, Field(discriminator="kind"), BeforeValidator(_target_kind)],
    ] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
    server: ServerConfig | None = None
    # Sent deliveries and the events no delivery needs any more are deleted once this old (7d);
    # 0 keeps everything. Task states are never deleted: they stop a finished task re-emitting.
    retention: Duration = 7 * 86400.0

    def secrets(self) -> list[str]:
        """Every configured value that must never reach a log, an error or a page."""
        found: list[str] = []
        for s in self.sources:
            found += [v for v in (s.api_key, s.push_token) if v]
        if self.server is not None:
            found += self.server.passthrough.tokens
            if self.server.auth is not None and self.server.auth.token:
                found.append(self.server.auth.token)
        for t in self.targets.values():
            match t:
                case AppriseTargetConfig(url=url):
                    found += url_secrets(url)
                case WebhookTargetConfig(webhook=webhook, secret=secret, headers=headers):
                    found += url_secrets(webhook)
                    found += [v for v in (secret, *headers.values()) if v]
                case DiscordTargetConfig():
                    found += [t.discord, t.webhook_token]
                case SlackTargetConfig(token=token):
                    found.append(token)
                case BrokerTargetCommon():
                    found += [v for v in (t.password(),) if v]
        return found


def url_secrets(url: str) -> list[str]:
    """A webhook or apprise URL whole, and its path and query: where such URLs keep their tokens,
    so they count as secrets wherever they appear (a library's log line shows them without the
    host). Short tails (`/hook`) carry no token and would only blot out ordinary words."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return [url, *(t for t in (tail, parts.query) if len(t) >= 8)]

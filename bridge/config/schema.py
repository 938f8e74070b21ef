"""rules.yaml as pydantic models (unknown keys refused), with durations, rates and booleans read
strictly. Pure: reading the file, `${VAR}` and pointing at lines are the loader's (`load.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ByteSize,
    Field,
    field_validator,
    model_validator,
)

from bridge.config.listen import Listen, is_loopback
from bridge.config.passwords import password_problem
from bridge.config.targets import (
    AppriseTargetConfig,
    BrokerTargetCommon,
    DiscordTargetConfig,
    SlackTargetConfig,
    TargetConfig,
    WebhookTargetConfig,
    http_base,
    target_kind,
)
from bridge.config.values import (
    Bool,
    Duration,
    KeyProblem,
    PositiveDuration,
    Strict,
    http_url,
    shown,
    url_secrets,
)


class SourceConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    base_url: str
    api_key: str | None = None
    # None: detected. The mj-api-secret header first (midjourney-proxy's own; trueai and new-api
    # accept it too), the other schemes tried once on a 401/403 (sources/auth.py).
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
        return http_url(value).rstrip("/")


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

    _public = field_validator("public_url")(lambda v: None if v is None else http_base(v))

    @model_validator(mode="after")
    def _protected(self) -> ServerConfig:
        if self.auth is None and not self.insecure and not is_loopback(self.listen.host):
            raise KeyProblem(
                "listen",
                f"{shown(str(self.listen))} reaches beyond this machine, and there is no "
                "server.auth: anyone on the network could read the status page and replay. "
                "Add server.auth (a token or users), listen on 127.0.0.1, or say insecure: true",
            )
        return self


class Config(Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    targets: dict[
        str,
        Annotated[TargetConfig, Field(discriminator="kind"), BeforeValidator(target_kind)],
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

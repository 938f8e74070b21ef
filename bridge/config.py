"""rules.yaml: pydantic models of the whole schema (unknown keys refused), `${VAR}` substitution,
durations and rates. Loading with FILE:LINE:COL errors lives in `load_config`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from bridge.errors import ConfigError, Problem

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """`250ms`, `5s`, `2m`, `1h`, `1d`, or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 250ms, 5s, 2m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m[1]) * _UNITS[m[2]]
    raise ValueError(f"{value!r} is not a duration such as 250ms, 5s, 2m or 1h")


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
    raise ValueError(f"{value!r} is not a rate such as 30/min, 5/s or 100/h")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[tuple[int, float], BeforeValidator(parse_rate)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    base_url: str
    api_key: str | None = None
    auth: Literal["bearer", "mj-api-secret", "raw", "none"] = "bearer"
    poll_interval: Duration = 5.0
    timeout: Duration = 10.0
    backfill: bool = False
    stall_after: Duration = 600.0
    push_token: str | None = None
    mode: Literal["auto", "list", "active", "ids"] = "auto"
    full_every: Duration = 600.0
    enrich: list[Literal["seed"]] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")


class TargetCommon(Strict):
    timeout: Duration = 10.0
    max_attempts: int = Field(default=8, ge=1)
    max_age: Duration = 86400.0
    rate_limit: Rate | None = None
    concurrency: int = Field(default=4, ge=1, le=64)


class AppriseTargetConfig(TargetCommon):
    kind: Literal["apprise"] = "apprise"
    url: str
    attach_image: bool = False


class WebhookTargetConfig(TargetCommon):
    kind: Literal["webhook"] = "webhook"
    webhook: str
    secret: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


TargetConfig = AppriseTargetConfig | WebhookTargetConfig


def _target_kind(value: Any) -> Any:
    """A string is an apprise URL; a mapping is told apart by its main key."""
    if isinstance(value, str):
        return {"kind": "apprise", "url": value}
    if isinstance(value, dict) and "kind" not in value:
        if "webhook" in value:
            return {"kind": "webhook", **value}
        return {"kind": "apprise", **value}
    return value


class GroupConfig(Strict):
    by: list[str] = Field(default_factory=lambda: ["source"])
    wait: Duration = 30.0


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
    stop: bool = False
    cancel: bool = False


class ServerConfig(Strict):
    listen: str = "127.0.0.1:8787"


class Config(Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    targets: dict[str, Annotated[TargetConfig, BeforeValidator(_target_kind)]] = Field(
        default_factory=dict
    )
    rules: list[RuleConfig] = Field(default_factory=list)
    server: ServerConfig | None = None

    def secrets(self) -> list[str]:
        """Every configured value that must never reach a log, an error or a page."""
        found: list[str] = []
        for s in self.sources:
            found += [v for v in (s.api_key, s.push_token) if v]
        for t in self.targets.values():
            match t:
                case AppriseTargetConfig(url=url):
                    found.append(url)
                case WebhookTargetConfig(secret=secret, headers=headers):
                    found += [v for v in (secret, *headers.values()) if v]
        return found


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; returns the text and the names that were missing."""
    env = dict(os.environ) if env is None else env
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name, default = m[1], m[2]
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _ENV.sub(repl, text), missing


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate rules.yaml. Raises ConfigError with every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), 1, 1, f"cannot read the file: {exc.strerror}")]
        ) from exc
    text, missing = substitute_env(text, env)
    problems = [
        Problem(str(path), 1, 1, f"environment variable {name} is not set and has no default")
        for name in missing
    ]
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([*problems, Problem(str(path), 1, 1, str(exc))]) from exc
    if problems:
        raise ConfigError(problems)
    return Config.model_validate(raw)

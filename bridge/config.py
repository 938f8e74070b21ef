"""Config stage: rules.yaml as pydantic models (unknown keys refused), `${VAR}` substitution,
durations and rates; `load_config` reports every problem at once as FILE:LINE:COL, and
`ConfigWatcher` swaps in a new file only after it validates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from bridge import rules, templates
from bridge.errors import ConfigError, Problem
from bridge.models import EVENT_TYPES

__all__ = [
    "AppriseTargetConfig",
    "ChatTargetCommon",
    "Config",
    "ConfigError",
    "ConfigWatcher",
    "DiscordTargetConfig",
    "GroupConfig",
    "Problem",
    "RuleConfig",
    "ServerConfig",
    "SlackTargetConfig",
    "SourceConfig",
    "TargetCommon",
    "TargetConfig",
    "WebhookTargetConfig",
    "check",
    "load_config",
    "parse_duration",
    "parse_rate",
    "substitute_env",
    "watch_config",
]

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
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        return float(value)  # a bare number of seconds, e.g. from ${POLL:-5}
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
            # The value is not echoed: it may carry credentials.
            raise ValueError("base_url must be an http:// or https:// URL")
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


# A Discord webhook URL: https://discord.com/api/webhooks/{id}/{token}, optionally ?thread_id=...
DISCORD_WEBHOOK = re.compile(
    r"^https://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/api(?:/v\d+)?/webhooks/"
    r"(?P<id>\d+)/(?P<token>[A-Za-z0-9_-]+)/?(?:\?(?P<query>[^#]*))?$"
)


def _api_base(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("api_base must be an http:// or https:// URL")
    return value.rstrip("/")


class ChatTargetCommon(TargetCommon):
    """What the chat targets share: one message per task, edited in place."""

    min_edit_interval: Duration = 2.0  # at most one edit of a task's message this often
    attach_image: bool = False  # download the final image and upload it with the message
    max_image_bytes: ByteSize = ByteSize(8 * 1024 * 1024)  # 8MiB; larger images are linked


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


TargetConfig = AppriseTargetConfig | WebhookTargetConfig | DiscordTargetConfig | SlackTargetConfig
TARGET_KINDS: tuple[str, ...] = ("apprise", "webhook", "discord", "slack")


def _target_kind(value: Any) -> Any:
    """A string is an apprise URL; a mapping is told apart by its main key (`webhook:`,
    `discord:`, `slack:`; else `url:`, apprise)."""
    if isinstance(value, str):
        return {"kind": "apprise", "url": value}
    if isinstance(value, dict) and "kind" not in value:
        for kind in ("webhook", "discord", "slack"):
            if kind in value:
                return {"kind": kind, **value}
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
    targets: dict[
        str,
        Annotated[TargetConfig, Field(discriminator="kind"), BeforeValidator(_target_kind)],
    ] = Field(default_factory=dict)
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
                case DiscordTargetConfig():
                    found += [t.discord, t.webhook_token]
                case SlackTargetConfig(token=token):
                    found.append(token)
        return found


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _env_value(name: str, default: str | None, env: dict[str, str]) -> str | None:
    """`${VAR:-default}` as in the shell: the default when VAR is unset or empty."""
    value = env.get(name)
    if value:
        return value
    if default is not None:
        return default
    return value


def substitute_env(text: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; returns the text and the names that were missing."""
    env = dict(os.environ) if env is None else env
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        value = _env_value(m[1], m[2], env)
        if value is None:
            missing.append(m[1])
        return value or ""

    return _ENV.sub(repl, text), missing


# --- reading YAML with positions ---------------------------------------------------------------

_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `on:` is a key and yes/no/on/off stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

Loc = tuple[str | int, ...]


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


class _Document:
    """One rules.yaml being read: builds plain Python data from the composed YAML, substitutes
    `${VAR}` per scalar, and remembers the node behind every path so problems point at it."""

    def __init__(self, file: str, text: str, env: dict[str, str]) -> None:
        self.file = file
        self.text = text
        self.env = env
        self.problems: list[Problem] = []
        self.nodes: dict[Loc, yaml.Node] = {}
        self.keys: dict[Loc, yaml.Node] = {}
        self.env_nodes: set[tuple[int, int]] = set()  # nodes whose ${VAR} was missing
        self._line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self._constructor = _Loader("")

    # positions
    def add(self, where: yaml.Node | int, message: str) -> None:
        if isinstance(where, int):
            line = bisect.bisect_right(self._line_starts, where) - 1
            column = where - self._line_starts[line]
        else:
            line, column = where.start_mark.line, where.start_mark.column
        self.problems.append(Problem(self.file, line + 1, column + 1, message))

    def at(self, loc: Loc) -> yaml.Node:
        """The node at `loc`, or the nearest enclosing one."""
        while loc not in self.nodes and loc:
            loc = loc[:-1]
        return self.nodes[loc]

    def key_at(self, loc: Loc) -> yaml.Node:
        return self.keys.get(loc) or self.at(loc)

    def line_of(self, loc: Loc) -> int:
        return int(self.at(loc).start_mark.line) + 1

    # building
    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.nodes.setdefault(loc, node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, yaml.Node] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges += (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.add(key_node, f"{_dotted(loc)}: a key must be a plain name")
                continue
            key = str(key_node.value)
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.add(key_node, f"{_dotted((*loc, key))}: duplicate key (first at line {first})")
                continue
            seen[key] = key_node
            self.keys[(*loc, key)] = key_node
            out[key] = self.build(value_node, (*loc, key))
        for merged in merges:
            if not isinstance(merged, yaml.MappingNode):
                self.add(merged, f"{_dotted(loc)}: << merges a mapping only")
                continue
            for key_node, value_node in merged.value:
                key = str(key_node.value)
                if key not in out:
                    self.keys.setdefault((*loc, key), key_node)
                    out[key] = self.build(value_node, (*loc, key))
        return out

    def _scalar(self, node: yaml.Node) -> Any:
        value = str(node.value)
        if "${" in value:
            # A substituted value stays text (pydantic reads "8" as 8 and "false" as false where
            # a field wants them), so an api key of digits is never turned into a number.
            return _ENV.sub(lambda m: self._variable(node, m), value)
        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            self.add(node, f"cannot read this value: {getattr(exc, 'problem', exc)}")
            return value

    def _variable(self, node: yaml.Node, m: re.Match[str]) -> str:
        value = _env_value(m[1], m[2], self.env)
        if value is None:
            found = self.text.find(m[0], node.start_mark.index, node.end_mark.index)
            self.add(found if found >= 0 else node, f"environment variable {m[1]} is not set "
                     "and has no default (write ${" + m[1] + ":-default} for one)")  # fmt: skip
            self.env_nodes.add((node.start_mark.line + 1, node.start_mark.column + 1))
        return value or ""


# --- problems pydantic finds -------------------------------------------------------------------


def _model_at(loc: Loc, raw: Any) -> type[BaseModel] | None:
    """The model that validates the mapping at `loc` (for "did you mean" hints)."""
    match loc:
        case ():
            return Config
        case ("sources", int()):
            return SourceConfig
        case ("targets", str() as name):
            value = raw.get("targets", {}).get(name) if isinstance(raw, dict) else None
            kind = _target_kind(value).get("kind") if isinstance(value, dict) else None
            models: dict[Any, type[BaseModel]] = {
                "webhook": WebhookTargetConfig,
                "discord": DiscordTargetConfig,
                "slack": SlackTargetConfig,
            }
            return models.get(kind, AppriseTargetConfig)
        case ("rules", int()):
            return RuleConfig
        case ("rules", int(), "group"):
            return GroupConfig
        case ("server",):
            return ServerConfig
    return None


def _validation_problems(doc: _Document, raw: Any, exc: ValidationError) -> None:
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        if len(loc) >= 3 and loc[0] == "targets" and loc[2] in TARGET_KINDS:
            loc = loc[:2] + loc[3:]  # the discriminated union's tag is not in the file
        kind = error["type"]
        if kind == "missing":
            doc.add(doc.at(loc), f"{_dotted(loc[:-1])}: missing required key '{loc[-1]}'")
        elif kind == "extra_forbidden":
            model = _model_at(loc[:-1], raw)
            hint = rules.suggest(str(loc[-1]), list(model.model_fields)) if model else ""
            doc.add(doc.key_at(loc), f"{_dotted(loc[:-1])}: unknown key '{loc[-1]}'{hint}")
        elif kind == "union_tag_invalid":
            doc.add(doc.at(loc), f"{_dotted(loc)}: kind must be apprise or webhook, "
                    "or discord or slack for chat")  # fmt: skip
        else:
            # pydantic's messages name the expected shape, never the input value.
            message = str(error["msg"]).removeprefix("Value error, ")
            doc.add(doc.at(loc), f"{_dotted(loc)}: {message}")


# --- cross-checks: what a schema alone cannot see ----------------------------------------------


def _check_unique(doc: _Document, raw: dict[str, Any], section: str) -> None:
    items = raw.get(section)
    if not isinstance(items, list):
        return
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            line = doc.line_of((section, first[name], "name"))
            doc.add(
                doc.at((section, i, "name")),
                f"{section}[{i}].name: duplicate name '{name}' (first at line {line})",
            )
        else:
            first[name] = i


def _apprise_problem(url: str) -> str | None:
    import apprise  # slow to import; only `check` and loading need it

    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        return "not an apprise URL (expected scheme://..., e.g. slack://, discord://, mailtos://)"
    logger = logging.getLogger("apprise")
    disabled, logger.disabled = logger.disabled, True  # apprise logs the whole URL on failure
    try:
        with warnings.catch_warnings():
            # apprise's plugin loader imports the deprecated imghdr module.
            warnings.simplefilter("ignore", DeprecationWarning)
            schemes = apprise.NotificationManager()  # type: ignore[no-untyped-call]
            if scheme.lower() not in schemes:
                return f"unknown apprise scheme '{scheme}://'"
            ok = apprise.Apprise().add(url)
    finally:
        logger.disabled = disabled
    return None if ok else f"apprise cannot use this {scheme}:// URL (check its tokens and options)"


def _check_targets(doc: _Document, raw: dict[str, Any]) -> None:
    targets = raw.get("targets")
    if not isinstance(targets, dict):
        return
    for name, value in targets.items():
        loc: Loc = ("targets", name)
        if isinstance(value, str):
            value = {"url": value}
            url_loc = loc
        else:
            url_loc = (*loc, "url")
        if not isinstance(value, dict):
            continue
        webhook, url, secret = value.get("webhook"), value.get("url"), value.get("secret")
        if isinstance(webhook, str):
            parts = urlsplit(webhook)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                doc.add(doc.at((*loc, "webhook")), f"{_dotted(loc)}.webhook: must be an http:// "
                        "or https:// URL")  # fmt: skip
        elif isinstance(url, str) and (problem := _apprise_problem(url)):
            doc.add(doc.at(url_loc), f"{_dotted(loc)}: {problem}")
        if isinstance(secret, str) and secret.startswith("whsec_"):
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                doc.add(doc.at((*loc, "secret")), f"{_dotted(loc)}.secret: the part after "
                        "whsec_ is not valid base64")  # fmt: skip


def _check_rule(doc: _Document, i: int, rule: dict[str, Any], targets: Any) -> None:
    loc: Loc = ("rules", i)
    on = _as_list(rule.get("on", ["*"]))
    types: set[str] = set()
    if on == []:
        doc.add(doc.at((*loc, "on")), f"rules[{i}].on: an empty list matches no event")
    for j, pattern in enumerate(on if isinstance(on, list) else []):
        if not isinstance(pattern, str):
            continue
        found = rules.expand_types(pattern)
        types.update(found)
        if found:
            continue
        where = doc.at((*loc, "on", j)) if isinstance(rule["on"], list) else doc.at((*loc, "on"))
        if rules.is_glob(pattern):
            doc.add(where, f"rules[{i}].on: '{pattern}' matches no event type")
        else:
            hint = rules.suggest(pattern, EVENT_TYPES)
            doc.add(where, f"rules[{i}].on: unknown event type '{pattern}'{hint}")
    only_source = bool(types) and all(t.startswith("source.") for t in types)

    to = _as_list(rule.get("to"))
    if to == [] and not rule.get("stop"):
        doc.add(doc.at((*loc, "to")), f"rules[{i}].to: no targets (an empty list only makes "
                "sense with stop: true, to drop events)")  # fmt: skip
    if isinstance(to, list) and isinstance(targets, dict):
        for j, name in enumerate(to):
            if isinstance(name, str) and name not in targets:
                where = (
                    doc.at((*loc, "to", j))
                    if isinstance(rule["to"], list)
                    else doc.at((*loc, "to"))
                )
                hint = rules.suggest(name, list(targets)) or (
                    f" (targets: {', '.join(targets)})" if targets else " (no targets defined)"
                )
                doc.add(where, f"rules[{i}].to: unknown target '{name}'{hint}")

    when = rule.get("when")
    for key, value in when.items() if isinstance(when, dict) else []:
        key_loc = (*loc, "when", key)
        try:
            path = rules.parse_path(key)
        except ValueError as exc:
            doc.add(doc.key_at(key_loc), f"rules[{i}].when: {exc}")
            continue
        if path.scope == "task" and only_source:
            doc.add(doc.key_at(key_loc), f"rules[{i}].when: '{key}' reads the task, but "
                    "source.* events carry none, so this rule never matches")  # fmt: skip
        items = value if isinstance(value, list) else [value]
        if not items:
            doc.add(doc.at(key_loc), f"rules[{i}].when.{key}: an empty list matches nothing")
        for j, item in enumerate(items):
            try:
                rules.parse_matcher(item)
            except ValueError as exc:
                where = doc.at((*key_loc, j)) if isinstance(value, list) else doc.at(key_loc)
                doc.add(where, f"rules[{i}].when.{key}: {exc}")

    group = rule.get("group")
    by = group.get("by") if isinstance(group, dict) else None
    for j, key in enumerate(by if isinstance(by, list) else []):
        if isinstance(key, str):
            try:
                rules.parse_path(key)
            except ValueError as exc:
                doc.add(doc.at((*loc, "group", "by", j)), f"rules[{i}].group.by: {exc}")

    for field in ("title", "body"):
        source = rule.get(field)
        if isinstance(source, str) and (failure := templates.check_template(source)):
            _template_problem(doc, (*loc, field), failure)


def _template_problem(doc: _Document, loc: Loc, failure: tuple[int, str]) -> None:
    lineno, message = failure
    node = doc.at(loc)
    text = f"{_dotted(loc)}: template error: {message}"
    if isinstance(node, yaml.ScalarNode) and node.style == "|":
        # A literal block's content starts on the line after `|`, one template line per line.
        line = node.start_mark.line + lineno
        if line < len(doc._line_starts):
            start = doc._line_starts[line]
            end = doc.text.find("\n", start)
            content = doc.text[start : end if end >= 0 else len(doc.text)]
            doc.add(start + len(content) - len(content.lstrip(" ")), text)
            return
    doc.add(node, text)


def _check_server(doc: _Document, raw: dict[str, Any]) -> None:
    server = raw.get("server")
    listen = server.get("listen") if isinstance(server, dict) else None
    if not isinstance(listen, str):
        return
    host, sep, port = listen.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) <= 65535):
        doc.add(doc.at(("server", "listen")), "server.listen: expected HOST:PORT such as "
                "127.0.0.1:8787")  # fmt: skip


def _cross_check(doc: _Document, raw: dict[str, Any]) -> None:
    _check_unique(doc, raw, "sources")
    _check_unique(doc, raw, "rules")
    _check_targets(doc, raw)
    _check_server(doc, raw)
    rule_list = raw.get("rules")
    for i, rule in enumerate(rule_list if isinstance(rule_list, list) else []):
        if isinstance(rule, dict):
            _check_rule(doc, i, rule, raw.get("targets"))


# --- loading -----------------------------------------------------------------------------------


def _finish(doc: _Document) -> list[Problem]:
    """Sorted by position, without repeats, and without follow-on problems at a node whose
    `${VAR}` was missing (the missing variable is the one thing to fix there)."""
    env_problems = {p for p in doc.problems if p.message.startswith("environment variable")}
    kept = {p for p in doc.problems if p in env_problems or (p.line, p.column) not in doc.env_nodes}
    return sorted(kept, key=lambda p: (p.line, p.column, p.message))


def _load(path: Path, env: dict[str, str] | None) -> tuple[Config | None, list[Problem]]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem(file, 1, 1, f"cannot read the file: {exc.strerror or exc}")]
    except UnicodeDecodeError:
        return None, [Problem(file, 1, 1, "the file is not UTF-8 text")]
    doc = _Document(file, text, dict(os.environ) if env is None else env)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" ({exc.context})" if exc.context else ""
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(file, line, column, f"invalid YAML: {exc.problem}{where}")]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 1, 1, f"invalid YAML: {exc}")]
    if root is None:
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
        root.start_mark = root.end_mark = yaml.Mark(file, 0, 0, 0, None, 0)
    raw = doc.build(root, ())
    if not isinstance(raw, dict):
        doc.add(root, "the file must be a mapping with sources, targets and rules")
        return None, _finish(doc)
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        _validation_problems(doc, raw, exc)
    try:
        _cross_check(doc, raw)
    except Exception as exc:  # a bug here must not hide the problems already found
        doc.add(root, f"internal error while checking the config: {type(exc).__name__}")
    problems = _finish(doc)
    return (None if problems else config), problems


def check(path: str | Path, env: dict[str, str] | None = None) -> list[Problem]:
    """Every problem of a rules.yaml, sorted by line; empty when it is valid."""
    return _load(Path(path), env)[1]


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate rules.yaml. Raises ConfigError with every problem found."""
    config, problems = _load(Path(path), env)
    if problems or config is None:
        raise ConfigError(problems)
    return config


# --- live reload -------------------------------------------------------------------------------


class ConfigWatcher:
    """Reloads rules.yaml when its content changes (polled) or when asked (`check_now(force=True)`
    on SIGHUP). A new config is validated whole before `on_change` sees it; an invalid one goes to
    `on_error` once per distinct content and the old config keeps running."""

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[Config], None],
        on_error: Callable[[ConfigError], None],
        *,
        interval: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._on_change = on_change
        self._on_error = on_error
        self._env = env
        self._digest = self._read_digest()  # the content the running config came from

    def _read_digest(self) -> str | None:
        try:
            return hashlib.blake2b(self.path.read_bytes(), digest_size=16).hexdigest()
        except OSError:
            return None

    def check_now(self, *, force: bool = False) -> Config | None:
        """Reload if the file changed (or always, with force). Returns the new config if one was
        swapped in."""
        digest = self._read_digest()
        if digest == self._digest and not force:
            return None
        self._digest = digest
        try:
            config = load_config(self.path, self._env)
        except ConfigError as exc:
            self._on_error(exc)
            return None
        self._on_change(config)
        return config

    def reload_now(self) -> Config | None:
        """For SIGHUP: validate and swap in the file as it is now, changed or not."""
        return self.check_now(force=True)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.check_now()


async def watch_config(
    path: str | Path,
    on_change: Callable[[Config], None],
    on_error: Callable[[ConfigError], None],
    interval: float = 1.0,
) -> None:
    await ConfigWatcher(path, on_change, on_error, interval=interval).run()

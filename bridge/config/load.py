"""Reading rules.yaml: YAML 1.2 with every node's position, pydantic errors and the cross-checks a
schema cannot see, all reported at once as FILE:LINE:COL problems.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import logging
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from bridge import rules, templates
from bridge.config.schema import (
    _ENV,
    TARGET_KINDS,
    AmqpTargetConfig,
    AppriseTargetConfig,
    Config,
    DiscordTargetConfig,
    GroupConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    PassthroughConfig,
    RedisTargetConfig,
    RuleConfig,
    ServerAuthConfig,
    ServerConfig,
    SlackTargetConfig,
    SourceConfig,
    WebhookTargetConfig,
    _as_list,
    _env_value,
    _target_kind,
)
from bridge.errors import ConfigError, Problem
from bridge.models import EVENT_TYPES, EventType

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
                "nats": NatsTargetConfig,
                "amqp": AmqpTargetConfig,
                "redis": RedisTargetConfig,
                "mqtt": MqttTargetConfig,
            }
            return models.get(kind, AppriseTargetConfig)
        case ("rules", int()):
            return RuleConfig
        case ("rules", int(), "group"):
            return GroupConfig
        case ("server",):
            return ServerConfig
        case ("server", "auth"):
            return ServerAuthConfig
        case ("server", "passthrough"):
            return PassthroughConfig
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
            doc.add(doc.at(loc), f"{_dotted(loc)}: kind must be apprise or webhook, discord "
                    "or slack for chat, or nats, amqp, redis or mqtt for a broker")  # fmt: skip
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


class _ThreadFilter(logging.Filter):
    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def _apprise_problem(url: str) -> str | None:
    import apprise  # slow to import; only `check` and loading need it

    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        return "not an apprise URL (expected scheme://..., e.g. slack://, discord://, mailtos://)"
    # apprise logs the whole URL on failure: drop this thread's apprise records meanwhile (not
    # the logger as a whole: a target may be sending in another thread and needs its reasons).
    logger = logging.getLogger("apprise")
    quiet = _ThreadFilter(threading.get_ident())
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            # apprise's plugin loader imports the deprecated imghdr module.
            warnings.simplefilter("ignore", DeprecationWarning)
            schemes = apprise.NotificationManager()  # type: ignore[no-untyped-call]
            if scheme.lower() not in schemes:
                return f"unknown apprise scheme '{scheme}://'"
            ok = apprise.Apprise().add(url)
    finally:
        logger.removeFilter(quiet)
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
        # A webhook's URL is checked by its schema.
        webhook, url, secret = value.get("webhook"), value.get("url"), value.get("secret")
        if webhook is None and isinstance(url, str) and (problem := _apprise_problem(url)):
            doc.add(doc.at(url_loc), f"{_dotted(loc)}: {problem}")
        if isinstance(secret, str) and secret.startswith("whsec_"):
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                doc.add(doc.at((*loc, "secret")), f"{_dotted(loc)}.secret: the part after "
                        "whsec_ is not valid base64")  # fmt: skip


def _check_rule(
    doc: _Document, i: int, rule: dict[str, Any], targets: Any, sources: list[str]
) -> None:
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

    if rule.get("cancel") is True and types and EventType.STALLED not in types:
        doc.add(doc.at((*loc, "cancel")), f"rules[{i}].cancel: cancel only acts on task.stalled "
                "events, and this rule's on: never matches task.stalled")  # fmt: skip

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
            where = doc.at((*key_loc, j)) if isinstance(value, list) else doc.at(key_loc)
            try:
                matcher = rules.parse_matcher(item)
            except ValueError as exc:
                doc.add(where, f"rules[{i}].when.{key}: {exc}")
                continue
            if key == "source" and matcher.text is not None and matcher.text not in sources:
                hint = rules.suggest(matcher.text, sources) or (
                    f" (sources: {', '.join(sources)})" if sources else " (no sources defined)"
                )
                doc.add(where, f"rules[{i}].when.source: unknown source '{matcher.text}'{hint}")

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


def _cross_check(doc: _Document, raw: dict[str, Any]) -> None:
    _check_unique(doc, raw, "sources")
    _check_unique(doc, raw, "rules")
    _check_targets(doc, raw)
    source_list = raw.get("sources")
    sources = [
        s["name"]
        for s in (source_list if isinstance(source_list, list) else [])
        if isinstance(s, dict) and isinstance(s.get("name"), str)
    ]
    rule_list = raw.get("rules")
    for i, rule in enumerate(rule_list if isinstance(rule_list, list) else []):
        if isinstance(rule, dict):
            _check_rule(doc, i, rule, raw.get("targets"), sources)


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

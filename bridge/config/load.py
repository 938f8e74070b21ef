"""Loading rules.yaml: read within bounds (`document`), validate the shape (`schema`), check what a
schema cannot see (`crosscheck`), and report every problem at once as FILE:LINE:COL, each saying
what to change (`messages`). Nothing a file holds makes loading raise anything but ConfigError.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bridge.config import crosscheck
from bridge.config.document import MAX_BYTES, Document, Loc, TooBig, compose, dotted
from bridge.config.messages import value_message, yaml_problem
from bridge.config.schema import (
    Config,
    GroupConfig,
    PassthroughConfig,
    RuleConfig,
    ServerAuthConfig,
    ServerConfig,
    SourceConfig,
)
from bridge.config.targets import (
    TARGET_KINDS,
    AmqpTargetConfig,
    AppriseTargetConfig,
    DiscordTargetConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    RedisTargetConfig,
    SlackTargetConfig,
    WebhookTargetConfig,
    target_kind,
)
from bridge.config.values import KeyProblem
from bridge.errors import ConfigError, Problem
from bridge.suggest import suggest

SECTIONS = ("sources", "targets", "rules", "server", "retention")
# Far above any real file, low enough that checking the largest one allowed takes seconds (each
# apprise URL and template is compiled to check it).
LIMITS = {"sources": 100, "targets": 1000, "rules": 1000}


def _model_at(loc: Loc, raw: Any) -> type[BaseModel] | None:
    """The model that validates the mapping at `loc` (for "did you mean" hints)."""
    match loc:
        case ():
            return Config
        case ("sources", int()):
            return SourceConfig
        case ("targets", str() as name):
            value = raw.get("targets", {}).get(name) if isinstance(raw, dict) else None
            kind = target_kind(value).get("kind") if isinstance(value, dict) else None
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


def _value(raw: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _validation_problems(doc: Document, raw: Any, exc: ValidationError) -> None:
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        if isinstance(about := error.get("ctx", {}).get("error"), KeyProblem):
            loc = (*loc, about.key)
        if len(loc) >= 3 and loc[0] == "targets" and loc[2] in TARGET_KINDS:
            loc = loc[:2] + loc[3:]  # the discriminated union's tag is not in the file
        kind = error["type"]
        if kind == "missing":
            doc.add(doc.at(loc), f"{dotted(loc[:-1])}: missing required key '{loc[-1]}'")
        elif kind == "extra_forbidden":
            model = _model_at(loc[:-1], raw)
            keys = [k for k in model.model_fields if k != "kind"] if model else []
            hint = suggest(str(loc[-1]), keys) or (
                f" (keys here: {', '.join(keys)})" if keys else ""
            )
            doc.add(doc.key_at(loc), f"{dotted(loc[:-1])}: unknown key '{loc[-1]}'{hint}")
        elif kind == "union_tag_invalid":
            doc.add(doc.at(loc), f"{dotted(loc)}: kind must be apprise or webhook, discord "
                    "or slack for chat, or nats, amqp, redis or mqtt for a broker")  # fmt: skip
        else:
            doc.add(doc.at(loc), value_message(doc, loc, error, _value(raw, loc)))


def _finish(doc: Document) -> list[Problem]:
    """Sorted by position, without repeats, without follow-on problems at a node whose value
    could not be read (a missing `${VAR}` is the one thing to fix there), and without any value
    that came from a variable."""
    kept = {
        doc.scrub(p)
        for p in doc.problems
        if p in doc.primary or (p.line, p.column) not in doc.unread
    }
    return sorted(kept, key=lambda p: (p.line, p.column, p.message))


def _read(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(
            f"the file is larger than {MAX_BYTES // 1024} KiB; a rules file needs far less"
        )
    return data.decode("utf-8")


def _only(root: yaml.MappingNode, section: str, name: str) -> None:
    """Keep one entry of a section (a target by its key, a source by its name), when it exists."""
    for key, value in root.value:
        if getattr(key, "value", None) != section:
            continue
        kept: list[Any]
        if isinstance(value, yaml.MappingNode):
            kept = [(k, v) for k, v in value.value if getattr(k, "value", None) == name]
        elif isinstance(value, yaml.SequenceNode):
            kept = [
                item
                for item in value.value
                if isinstance(item, yaml.MappingNode)
                and any(getattr(k, "value", None) == "name" and getattr(v, "value", None) == name
                        for k, v in item.value)
            ]  # fmt: skip
        else:
            return
        if kept:
            value.value = kept


def _load(
    path: Path,
    env: dict[str, str] | None,
    sections: Collection[str] = SECTIONS,
    only: Mapping[str, str] | None = None,
) -> tuple[Config | None, list[Problem]]:
    file = str(path)
    try:
        text = _read(path)
    except OSError as exc:
        return None, [Problem(file, 1, 1, f"cannot read the file: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        data = exc.object
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = "this byte is not UTF-8 text (save the file as UTF-8)"
        return None, [Problem(file, line, column, message)]
    except ValueError as exc:
        return None, [Problem(file, 1, 1, str(exc))]
    doc = Document(file, text, dict(os.environ) if env is None else env)
    try:
        root = compose(text)
    except yaml.YAMLError as exc:
        yaml_problem(doc, exc)
        return None, _finish(doc)
    except RecursionError:  # a bound above should make this unreachable; never a traceback
        return None, [Problem(file, 1, 1, "invalid YAML: nested too deeply")]
    if root is None:
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
        root.start_mark = root.end_mark = yaml.Mark(file, 0, 0, 0, None, 0)
    elif isinstance(root, yaml.MappingNode) and set(sections) != set(SECTIONS):
        # A command that needs a part of the file reads only that part (and its variables).
        root.value = [(k, v) for k, v in root.value if getattr(k, "value", None) in sections]
        for section, name in (only or {}).items():
            _only(root, section, name)
    try:
        raw = doc.build(root, ())
    except TooBig as exc:
        # At the top-level key whose value grows too big: an expanded node's own place is an
        # anchor somewhere else.
        doc.add(doc.key_at(exc.loc[:1]), f"invalid YAML: {exc.message}")
        return None, _finish(doc)
    if not isinstance(raw, dict):
        doc.add(root, "the file must be a mapping with sources, targets and rules")
        return None, _finish(doc)
    too_many = False
    for section, limit in LIMITS.items():
        if isinstance(raw.get(section), list | dict) and len(raw[section]) > limit:
            count = len(raw[section])
            message = f"{section}: at most {limit:,} {section} in one file (this one has {count:,})"
            doc.add(doc.key_at((section,)), message + "; split them over more bridges")
            too_many = True
    if too_many:
        return None, _finish(doc)
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        _validation_problems(doc, raw, exc)
    try:
        crosscheck.check_unique(doc, raw, "sources")
        crosscheck.check_unique(doc, raw, "rules")
        crosscheck.check_targets(doc, raw)
        crosscheck.check_rules(doc, raw)
    except Exception as exc:  # a bug here must not hide the problems already found
        doc.add(root, f"internal error while checking the config: {type(exc).__name__}")
    problems = _finish(doc)
    return (None if problems else config), problems


def check(path: str | Path, env: dict[str, str] | None = None) -> list[Problem]:
    """Every problem of a rules.yaml, sorted by line; empty when it is valid."""
    return _load(Path(path), env)[1]


def load_config(
    path: str | Path,
    env: dict[str, str] | None = None,
    *,
    sections: Collection[str] = SECTIONS,
    only: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate rules.yaml. Raises ConfigError with every problem found. `sections`
    limits reading to the top-level keys a command needs, and `only` to one named entry of a
    section ({"targets": "hook"}); the rest and its variables are not read."""
    config, problems = _load(Path(path), env, sections, only)
    if problems or config is None:
        raise ConfigError(problems)
    return config

"""What a rule's `on`, `when` and `group.by` say, parsed: field paths (`properties.botType`),
matchers (a value, a /regex/ or null) and event-type patterns. Pure; used by the rules stage.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from bridge import models, templates
from bridge.models import EVENT_TYPES, Event
from bridge.suggest import suggest

# Top-level task fields a `when` key may name without the `task.` prefix: the documented ones
# plus the extras the known upstreams send (trueai, new-api). `task.anything` reaches the rest.
TASK_FIELDS: frozenset[str] = frozenset(models.TASK_FIELDS) | {
    "botType", "realBotType", "mode", "requestMode", "seed", "seedError", "parentId", "userId",
    "nonce", "messageId", "messageIds", "instanceId", "promptFull", "imageUrls", "thumbnailUrl",
    "videoUrl", "videoUrls", "width", "height", "imageWidth", "imageHeight", "jobId", "version",
    "useTime", "clientIp", "isCompleted", "displays", "customId", "maskBase64",
}  # fmt: skip
EVENT_KEYS = ("source", "type")  # bare keys that read the event rather than the task
SCOPES = ("task", "previous", "data")
_REGEX = re.compile(r"^/(?P<pattern>.*)/(?P<flags>[a-zA-Z]*)$", re.DOTALL)
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass(frozen=True, slots=True)
class Path:
    """Where a `when`/`group.by` key reads: `scope` is event, task, previous or data."""

    key: str
    scope: str
    parts: tuple[str, ...]

    def values(self, event: Event) -> list[Any]:
        """Every non-null value found; lists along the way are searched element by element."""
        if self.scope == "event":
            return [getattr(event, self.parts[0])]
        root = {"task": event.task, "previous": event.previous, "data": event.data}[self.scope]
        found: list[Any] = [root] if root is not None else []
        for part in self.parts:
            step: list[Any] = []
            for item in found:
                for obj in item if isinstance(item, list) else [item]:
                    if isinstance(obj, dict) and obj.get(part) is not None:
                        step.append(obj[part])
            found = step
        return [v for item in found for v in (item if isinstance(item, list) else [item])]


def parse_path(key: str) -> Path:
    """`action`, `properties.botType`, `task.anyField`, `previous.status`, `data.reason`,
    `source`, `type`. Raises ValueError naming what is wrong."""
    if key in EVENT_KEYS:
        return Path(key, "event", (key,))
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise ValueError(f"'{key}' is not a field path such as action or properties.botType")
    if parts[0] in SCOPES and len(parts) > 1:
        return Path(key, parts[0], parts[1:])
    if parts[0] in TASK_FIELDS:
        return Path(key, "task", parts)
    hint = suggest(parts[0], sorted([*TASK_FIELDS, *EVENT_KEYS]))
    raise ValueError(
        f"unknown task field '{parts[0]}'{hint}; write task.{key} for a field your upstream adds"
    )


def as_text(value: Any) -> str:
    """Scalars compare as their text: true/false as in YAML and JSON, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


@dataclass(frozen=True, slots=True)
class Matcher:
    """One accepted value: exact text, a regex (searched), or None for "absent or null"."""

    text: str | None = None
    regex: re.Pattern[str] | None = None

    def holds(self, values: list[Any]) -> bool:
        if self.regex is not None:
            return any(self.regex.search(as_text(v)) for v in values)
        if self.text is None:
            return not values
        return any(as_text(v) == self.text for v in values)

    def __str__(self) -> str:
        if self.regex is not None:
            return f"/{self.regex.pattern}/"
        return "null" if self.text is None else repr(self.text)


def parse_matcher(value: Any) -> Matcher:
    """A scalar, `/regex/flags` (flags among i, m, s, x) or null. Raises ValueError."""
    if isinstance(value, dict | list):
        raise ValueError(
            "expected a value, a /regex/ or a list of them"
            " (reach nested fields with a dotted key such as properties.botType)"
        )
    if value is None:
        return Matcher()
    if isinstance(value, str) and (m := _REGEX.match(value)):
        flags = 0
        for flag in m["flags"]:
            if flag not in _FLAGS:
                raise ValueError(f"unknown regex flag '{flag}' (use i, m, s or x)")
            flags |= _FLAGS[flag]
        try:
            return Matcher(regex=re.compile(m["pattern"], flags))
        except re.error as exc:
            raise ValueError(f"bad regex: {exc}") from exc
    return Matcher(text=as_text(value))


@dataclass(frozen=True, slots=True)
class Condition:
    path: Path
    matchers: tuple[Matcher, ...]

    def failure(self, event: Event) -> str | None:
        """None when the condition holds, else why not."""
        if self.path.scope == "task" and event.task is None:
            return f"when {self.path.key}: {event.type} events carry no task"
        values = self.path.values(event)
        if any(m.holds(values) for m in self.matchers):
            return None
        wanted = " or ".join(str(m) for m in self.matchers)
        have = ", ".join(repr(templates.oneline(as_text(v))[:60]) for v in values) or "nothing"
        return f"when {self.path.key}: has {have}, wanted {wanted}"


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_types(pattern: str) -> list[str]:
    """The known event types a pattern of `on` matches."""
    if is_glob(pattern):
        return [t for t in EVENT_TYPES if fnmatch.fnmatchcase(t, pattern)]
    return [pattern] if pattern in EVENT_TYPES else []

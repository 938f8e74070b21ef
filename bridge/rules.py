"""Rules stage: events + rules -> deliveries, rendered by templates.py. Pure apart from the memory
that throttles and digest windows need; the clock is passed in (`now`), so tests control time.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge import templates
from bridge.models import EVENT_TYPES, Delivery, Event, Task, delivery_id

if TYPE_CHECKING:
    from bridge.config import Config, RuleConfig

# Top-level task fields a `when` key may name without the `task.` prefix: the shared Task model
# plus the extras the known upstreams send (trueai, new-api). `task.anything` reaches the rest.
TASK_FIELDS: frozenset[str] = frozenset(Task.model_fields) | {
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
    hint = suggest(parts[0], [*TASK_FIELDS, *EVENT_KEYS])
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


def parse_condition(key: str, value: Any) -> Condition:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("an empty list matches nothing")
    return Condition(parse_path(key), tuple(parse_matcher(v) for v in items))


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_types(pattern: str) -> list[str]:
    """The known event types a pattern of `on` matches."""
    if is_glob(pattern):
        return [t for t in EVENT_TYPES if fnmatch.fnmatchcase(t, pattern)]
    return [pattern] if pattern in EVENT_TYPES else []


def suggest(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True, slots=True)
class Match:
    """What one rule made of one event, for `bridge explain`."""

    rule: str
    matched: bool
    reason: str = ""  # why it did not match, or why it was not reached
    deliveries: tuple[Delivery, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class CompiledRule:
    config: RuleConfig
    name: str
    patterns: tuple[str, ...]
    conditions: tuple[Condition, ...]
    group_by: tuple[Path, ...] | None
    titles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, rule: RuleConfig) -> CompiledRule:
        conditions = tuple(parse_condition(k, v) for k, v in rule.when.items())
        group_by = tuple(parse_path(k) for k in rule.group.by) if rule.group else None
        return cls(rule, rule.name, tuple(rule.on), conditions, group_by)

    def failure(self, event: Event) -> str | None:
        if not any(fnmatch.fnmatchcase(event.type, p) for p in self.patterns):
            return f"on [{', '.join(self.patterns)}] does not include {event.type}"
        for condition in self.conditions:
            if (why := condition.failure(event)) is not None:
                return why
        return None

    def render(self, event: Event) -> tuple[str, str]:
        ctx = templates.context(event, self.name)
        title_default = templates.default_title(event.type)
        body_default = templates.default_body(event.type)
        title = templates.render_text(self.config.title or title_default, ctx, title_default)
        body = templates.render_text(self.config.body or body_default, ctx, body_default)
        return templates.oneline(title), body

    def group_key(self, event: Event) -> str | None:
        if self.group_by is None:
            return None
        parts = [self.name]
        for path in self.group_by:
            values = path.values(event)
            parts.append(f"{path.key}={as_text(values[0]) if values else ''}")
        return "|".join(parts)


class Router:
    """Routes events through the rules in order. One delivery per (event, target): when several
    rules send an event to the same target, the first one's text wins."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        previous: Router | None = None,
    ) -> None:
        self._rules = [CompiledRule.build(r) for r in config.rules]
        # A webhook carries the event itself, never a title or body: no text is rendered for it.
        self._textless = frozenset(
            name for name, t in config.targets.items() if t.kind == "webhook"
        )
        self._clock = clock
        self._throttled: dict[tuple[str, str, str], float] = {}  # (rule, source, subject) -> until
        self._windows: dict[str, float] = {}  # digest group -> when its window closes
        self._next_prune = 0.0
        if previous is not None:
            # A reload keeps what the rules that are still there remember: a throttled task
            # stays throttled and an open digest window stays open across an edit of the file.
            kept = {rule.name for rule in self._rules}
            self._throttled = {k: v for k, v in previous._throttled.items() if k[0] in kept}
            self._windows = {
                k: v for k, v in previous._windows.items() if k.partition("|")[0] in kept
            }

    def route(self, events: Sequence[Event], now: float | None = None) -> list[Delivery]:
        now = self._clock() if now is None else now
        self._prune(now)
        deliveries: list[Delivery] = []
        for event in events:
            deliveries += self._route_one(event, now)
        return deliveries

    def _route_one(self, event: Event, now: float) -> list[Delivery]:
        out: list[Delivery] = []
        claimed: set[str] = set()
        for rule in self._rules:
            if rule.failure(event) is not None:
                continue
            if self._throttle(rule, event, now):
                out += self._deliveries(rule, event, claimed)
            if rule.config.stop:
                break
        return out

    def _throttle(self, rule: CompiledRule, event: Event, now: float) -> bool:
        """True when the rule may notify; records the send for the throttle window."""
        window = rule.config.throttle
        if not window:
            return True
        key = (rule.name, event.source, event.subject)
        if self._throttled.get(key, 0.0) > now:
            return False
        self._throttled[key] = now + window
        return True

    def _deliveries(self, rule: CompiledRule, event: Event, claimed: set[str]) -> list[Delivery]:
        targets = [t for t in rule.config.to if t not in claimed]
        if not targets:
            return []
        claimed.update(targets)
        title, body = ("", "") if self._textless.issuperset(targets) else rule.render(event)
        group, not_before = self._digest(rule, event)
        return [
            Delivery(delivery_id(event.id, t), t, rule.name, event, title, body, group, not_before)
            for t in targets
        ]

    def _digest(self, rule: CompiledRule, event: Event) -> tuple[str | None, datetime | None]:
        """The first event of a group opens a window of `wait` from its time; every event of the
        group that arrives inside the window is due when it closes, so all go as one digest."""
        key = rule.group_key(event)
        if key is None or rule.config.group is None:
            return None, None
        at = event.time.timestamp()
        closes = self._windows.get(key)
        if closes is None or at >= closes:
            closes = at + rule.config.group.wait
            self._windows[key] = closes
        return key, datetime.fromtimestamp(closes, UTC)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + 60.0
        self._throttled = {k: v for k, v in self._throttled.items() if v > now}
        self._windows = {k: v for k, v in self._windows.items() if v > now - 3600.0}

    def cancels(self, event: Event) -> list[str]:
        """The `cancel: true` rules that match `event`, as routing reaches them (`stop` holds)."""
        wanted = {rule.name for rule in self._rules if rule.config.cancel}
        if not wanted:
            return []
        return [m.rule for m in self.explain(event) if m.matched and m.rule in wanted]

    def explain(self, event: Event) -> list[Match]:
        """What every rule makes of `event`, without touching throttle or digest memory."""
        matches: list[Match] = []
        claimed: dict[str, str] = {}
        stopped_by: str | None = None
        for rule in self._rules:
            if stopped_by is not None:
                matches.append(Match(rule.name, False, f"not reached: '{stopped_by}' has stop"))
                continue
            if (why := rule.failure(event)) is not None:
                matches.append(Match(rule.name, False, why))
                continue
            notes = [
                f"{t}: already gets this event from rule '{claimed[t]}'"
                for t in rule.config.to
                if t in claimed
            ]
            targets = [t for t in rule.config.to if t not in claimed]
            claimed.update(dict.fromkeys(targets, rule.name))
            title, body = rule.render(event)
            group = rule.group_key(event)
            not_before = None
            if rule.config.group is not None:
                closes = event.time.timestamp() + rule.config.group.wait
                not_before = datetime.fromtimestamp(closes, UTC)
                notes.append(
                    f"digest group '{group}': sent together with the group's other "
                    f"events {templates.duration(rule.config.group.wait)} after the "
                    "first one"
                )
            if rule.config.throttle:
                notes.append(
                    f"throttle: at most one notification per task every "
                    f"{templates.duration(rule.config.throttle)}"
                )
            deliveries = tuple(
                Delivery(
                    delivery_id(event.id, t), t, rule.name, event, title, body, group, not_before
                )
                for t in targets
            )
            matches.append(Match(rule.name, True, "", deliveries, tuple(notes)))
            if rule.config.stop:
                stopped_by = rule.name
        return matches

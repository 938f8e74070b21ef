"""Rules stage: events + rules -> deliveries, rendered by templates.py. Pure apart from the memory
that throttles and digest windows need; the clock is passed in (`now`), so tests control time.
A rule is compiled once (`compile_rule`): the loader reports its problems, the router runs it.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge import templates
from bridge.conditions import (
    Condition,
    Matcher,
    Path,
    as_text,
    expand_types,
    is_glob,
    parse_matcher,
    parse_path,
)
from bridge.models import EVENT_TYPES, Delivery, Event, EventType, delivery_id
from bridge.sandbox import TemplateLimit
from bridge.suggest import EVENT_MEANINGS, FILTER_MEANINGS, suggest

if TYPE_CHECKING:
    from bridge.config import Config, RuleConfig

__all__ = [
    "CompiledRule",
    "Condition",
    "Match",
    "Matcher",
    "Path",
    "Router",
    "RuleIssue",
    "as_text",
    "compile_rule",
    "parse_matcher",
    "parse_path",
]


@dataclass(frozen=True, slots=True)
class Match:
    """What one rule made of one event: routing, `bridge explain` and cancels read the same."""

    rule: str
    matched: bool
    reason: str = ""  # why it did not match, or why it was not reached
    deliveries: tuple[Delivery, ...] = ()
    notes: tuple[str, ...] = ()
    throttled: bool = False  # matched, but the rule notified about this task too recently


@dataclass(slots=True)
class CompiledRule:
    config: RuleConfig
    name: str
    patterns: tuple[str, ...]
    conditions: tuple[Condition, ...]
    group_by: tuple[Path, ...] | None

    @classmethod
    def build(cls, rule: RuleConfig) -> CompiledRule:
        """The compiled rule; raises ValueError when its `when` or `group.by` cannot run (a
        config from the loader never has such a rule)."""
        compiled, issues = compile_rule(rule)
        by = rule.group.by if rule.group else []
        if len(compiled.conditions) < len(rule.when) or len(compiled.group_by or ()) < len(by):
            raise ValueError(next(i.message for i in issues if i.path[0] in ("when", "group")))
        return compiled

    def failure(self, event: Event) -> str | None:
        if not any(fnmatch.fnmatchcase(event.type, p) for p in self.patterns):
            return f"on [{', '.join(self.patterns)}] does not include {event.type}"
        for condition in self.conditions:
            if (why := condition.failure(event)) is not None:
                return why
        return None

    def render(self, event: Event) -> tuple[str, str, str | None]:
        """Title, body and, when a template of the rule went over a limit of the sandbox, why:
        the texts are then the defaults, and the deliveries become dead letters saying so."""
        ctx = templates.context(event, self.name)
        title_default = templates.default_title(event.type)
        body_default = templates.default_body(event.type)
        try:
            title = templates.render_text(self.config.title or title_default, ctx, title_default)
            body = templates.render_text(self.config.body or body_default, ctx, body_default)
        except TemplateLimit as exc:
            title = templates.render_text(title_default, ctx, templates.FALLBACK_TITLE)
            body = templates.render_text(body_default, ctx, templates.FALLBACK_BODY)
            return templates.oneline(title), body, f"rule '{self.name}': template stopped: {exc}"
        return templates.oneline(title), body, None

    def group_key(self, event: Event) -> str | None:
        if self.group_by is None:
            return None
        parts = [self.name]
        for path in self.group_by:
            values = path.values(event)
            parts.append(f"{path.key}={as_text(values[0]) if values else ''}")
        return "|".join(parts)


@dataclass(frozen=True, slots=True)
class RuleIssue:
    """A problem of one rule: `path` inside the rule (("when", "action", 1)), and whether it is
    about the key at the path rather than its value; `line` is the line inside a template."""

    path: tuple[str | int, ...]
    message: str
    key: bool = False
    line: int = 0


def compile_rule(
    rule: RuleConfig,
    targets: Collection[str] | None = None,
    sources: Collection[str] | None = None,
) -> tuple[CompiledRule, list[RuleIssue]]:
    """The one place a rule is parsed: its compiled form (parts that failed left out) and every
    problem found. Given `targets` and `sources`, names the rule uses are checked against them."""
    issues: list[RuleIssue] = []
    types: set[str] = set()
    if not rule.on:
        issues.append(RuleIssue(("on",), "an empty list matches no event"))
    for j, pattern in enumerate(rule.on):
        found = expand_types(pattern)
        types.update(found)
        if not found and is_glob(pattern):
            issues.append(RuleIssue(("on", j), f"'{pattern}' matches no event type"))
        elif not found:
            hint = suggest(pattern, EVENT_TYPES, EVENT_MEANINGS)
            issues.append(RuleIssue(("on", j), f"unknown event type '{pattern}'{hint}"))

    if not rule.to and not rule.stop:
        issues.append(RuleIssue(("to",), "no targets (an empty list only makes sense with "
                                "stop: true, to drop events)"))  # fmt: skip
    for j, name in enumerate(rule.to):
        if targets is not None and name not in targets:
            hint = suggest(name, sorted(targets)) or (
                f" (targets: {', '.join(targets)})" if targets else " (no targets defined)"
            )
            issues.append(RuleIssue(("to", j), f"unknown target '{name}'{hint}"))
    if rule.cancel and types and EventType.STALLED not in types:
        issues.append(RuleIssue(("cancel",), "cancel only acts on task.stalled events, and this "
                                "rule's on: never matches task.stalled"))  # fmt: skip

    only_source = bool(types) and all(t.startswith("source.") for t in types)
    conditions = _conditions(rule.when, only_source, sources, issues)
    group_by: list[Path] = []
    for j, key in enumerate(rule.group.by if rule.group else ()):
        try:
            group_by.append(parse_path(key))
        except ValueError as exc:
            issues.append(RuleIssue(("group", "by", j), str(exc)))

    for name, source in (("title", rule.title), ("body", rule.body)):
        if source is not None and (failure := _template_failure(source)):
            issues.append(RuleIssue((name,), f"template error: {failure[1]}", line=failure[0]))

    compiled = CompiledRule(
        rule, rule.name, tuple(rule.on), tuple(conditions), tuple(group_by) if rule.group else None
    )
    return compiled, issues


def _conditions(
    when: dict[str, Any],
    only_source: bool,
    sources: Collection[str] | None,
    issues: list[RuleIssue],
) -> list[Condition]:
    """`when` compiled: the conditions that parse; the problems of the others go to `issues`."""
    conditions: list[Condition] = []
    for key, value in when.items():
        try:
            path = parse_path(key)
        except ValueError as exc:
            issues.append(RuleIssue(("when", key), str(exc), key=True))
            continue
        if path.scope == "task" and only_source:
            why = f"'{key}' reads the task, but source.* events carry none: this rule never matches"
            issues.append(RuleIssue(("when", key), why, key=True))
        items = value if isinstance(value, list) else [value]
        if not items:
            issues.append(RuleIssue(("when", key), "an empty list matches nothing"))
        matchers: list[Matcher] = []
        for j, item in enumerate(items):
            try:
                matchers.append(parse_matcher(item))
            except ValueError as exc:
                issues.append(RuleIssue(("when", key, j), str(exc)))
                continue
            text = matchers[-1].text
            if key == "source" and sources is not None and text is not None and text not in sources:
                hint = suggest(text, sorted(sources)) or (
                    f" (sources: {', '.join(sources)})" if sources else " (no sources defined)"
                )
                issues.append(RuleIssue(("when", key, j), f"unknown source '{text}'{hint}"))
        if items and len(matchers) == len(items):
            conditions.append(Condition(path, tuple(matchers)))
    return conditions


def _template_failure(source: str) -> tuple[int, str] | None:
    """templates.check_template, with a "did you mean" for an unknown filter or time zone."""
    try:
        failure = templates.check_template(source)
    except (RecursionError, MemoryError):
        return 1, "the template is nested too deeply to compile"
    if failure is None:
        return None
    line, message = failure
    if m := re.search(r"No (filter|test) named '([^']*)'", message):
        choices = sorted(templates.ENV.filters if m[1] == "filter" else templates.ENV.tests)
        meanings = FILTER_MEANINGS if m[1] == "filter" else None
        message = message.rstrip(".") + suggest(m[2], choices, meanings)
    elif m := re.search(r"unknown time zone '([^']*)'", message):
        message += suggest(m[1], _zones()) or " (an IANA name such as Europe/Berlin or UTC)"
    return line, message


def _zones() -> list[str]:
    import zoneinfo

    return sorted(zoneinfo.available_timezones())


_CANCELS_KEPT = 1024  # stalls whose routed cancel decision waits for `cancels()`


class Router:
    """Routes events through the rules in order. One delivery per (event, target): when several
    rules send an event to the same target, the first one's text wins. Routing, `explain` and
    `cancels` share one evaluation (`_evaluate`), so they never disagree."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        previous: Router | None = None,
    ) -> None:
        self._rules = [CompiledRule.build(r) for r in config.rules]
        # A webhook or a broker carries the event itself, never a title or body: no text is
        # rendered for it.
        self._textless = frozenset(
            name
            for name, t in config.targets.items()
            if t.kind in ("webhook", "nats", "amqp", "redis", "mqtt")
        )
        self._clock = clock
        self._throttled: dict[tuple[str, str, str], float] = {}  # (rule, source, subject) -> until
        self._windows: dict[str, float] = {}  # digest group -> when its window closes
        self._window_memory = max(
            [3600.0] + [r.group.interval or 0.0 for r in config.rules if r.group is not None]
        )
        self._next_prune = 0.0
        # `cancel: true` rules, and what routing decided for the stalls it saw (for `cancels`).
        self._cancelling = frozenset(r.name for r in config.rules if r.cancel)
        self._cancels: dict[str, list[str]] = {}
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
            matches = self._evaluate(event, now, record=True)
            for match in matches:
                deliveries += match.deliveries
            if event.type == EventType.STALLED and self._cancelling:
                self._cancels[event.id] = self._cancel_rules(matches)
                while len(self._cancels) > _CANCELS_KEPT:
                    del self._cancels[next(iter(self._cancels))]
        return deliveries

    def explain(self, event: Event, now: float | None = None) -> list[Match]:
        """What every rule makes of `event`, as routing would, without touching the throttle or
        digest memory."""
        return self._evaluate(event, self._clock() if now is None else now, record=False)

    def cancels(self, event: Event) -> list[str]:
        """The `cancel: true` rules that matched `event` when it was routed (`stop` and throttles
        hold); an event not routed here is evaluated as routing would."""
        found = self._cancels.pop(event.id, None)
        if found is not None:
            return found
        if not self._cancelling:
            return []
        return self._cancel_rules(self.explain(event))

    def _cancel_rules(self, matches: Sequence[Match]) -> list[str]:
        return [
            m.rule for m in matches if m.matched and not m.throttled and m.rule in self._cancelling
        ]

    def _evaluate(self, event: Event, now: float, *, record: bool) -> list[Match]:
        """The one evaluation of the rules for one event, in order. `record` remembers what the
        throttles and digest windows must (routing); without it nothing changes (explain)."""
        matches: list[Match] = []
        claimed: dict[str, str] = {}  # target -> the rule whose text it gets
        stopped_by: str | None = None
        for rule in self._rules:
            if stopped_by is not None:
                matches.append(Match(rule.name, False, f"not reached: '{stopped_by}' has stop"))
                continue
            if (why := rule.failure(event)) is not None:
                matches.append(Match(rule.name, False, why))
                continue
            if rule.config.stop:
                stopped_by = rule.name
            notes: list[str] = []
            window = rule.config.throttle
            if window:
                notes.append(
                    "throttle: at most one notification per task every "
                    f"{templates.duration(window)}"
                )
                key = (rule.name, event.source, event.subject)
                if self._throttled.get(key, 0.0) > now:
                    notes.append("throttled: this task was notified by this rule too recently")
                    matches.append(Match(rule.name, True, "", (), tuple(notes), throttled=True))
                    continue
                if record:
                    self._throttled[key] = now + window
            notes += [
                f"{t}: already gets this event from rule '{claimed[t]}'"
                for t in rule.config.to
                if t in claimed
            ]
            targets = [t for t in rule.config.to if t not in claimed]
            claimed.update(dict.fromkeys(targets, rule.name))
            textless = record and self._textless.issuperset(targets)
            title, body, error = ("", "", None) if textless or not targets else rule.render(event)
            if error is not None:
                notes.append(f"{error}; its deliveries become dead letters with the default text")
            group, not_before = self._digest(rule, event, record) if targets else (None, None)
            if group is not None and not_before is not None:
                after = max(0.0, not_before.timestamp() - event.time.timestamp())
                notes.append(
                    f"digest group '{group}': sent together with the group's other events "
                    f"{templates.duration(after)} after this one"
                )
            deliveries = tuple(
                Delivery(
                    delivery_id(event.id, t),
                    t,
                    rule.name,
                    event,
                    title,
                    body,
                    group,
                    not_before,
                    error,
                )
                for t in targets
            )
            matches.append(Match(rule.name, True, "", deliveries, tuple(notes)))
        return matches

    def _digest(
        self, rule: CompiledRule, event: Event, record: bool
    ) -> tuple[str | None, datetime | None]:
        """Alertmanager's grouping for events. The first event of a quiet group opens a window
        of `wait` (group_wait); every event of the group inside the window is due when it
        closes, so all go as one digest. With `interval` (group_interval) the next window closes
        no sooner than `interval` after the last one: at most one message per interval."""
        key = rule.group_key(event)
        group = rule.config.group
        if key is None or group is None:
            return None, None
        at = event.time.timestamp()
        closes = self._windows.get(key)
        if closes is None or at >= closes:
            opens = at + group.wait
            if closes is not None and group.interval:
                opens = max(opens, closes + group.interval)
            closes = opens
            if record:
                self._windows[key] = closes
        return key, datetime.fromtimestamp(closes, UTC)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + 60.0
        self._throttled = {k: v for k, v in self._throttled.items() if v > now}
        # A window is remembered as long as it can still hold the next one back.
        self._windows = {k: v for k, v in self._windows.items() if v > now - self._window_memory}

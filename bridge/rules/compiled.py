"""Rules stage: a rule compiled once (`compile_rule`). The loader reports its problems with their
paths (FILE:LINE:COL); the router (router.py) runs the compiled form. Pure.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection
from dataclasses import dataclass
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
from bridge.models import EVENT_TYPES, Event, EventType
from bridge.sandbox import TemplateLimit
from bridge.suggest import EVENT_MEANINGS, FILTER_MEANINGS, suggest

if TYPE_CHECKING:
    from bridge.config import RuleConfig


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

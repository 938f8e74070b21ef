"""Cross-checks: what the schema alone cannot see. Names unique, apprise URLs apprise can use,
webhook secrets that decode, and each rule compiled once (`rules.compile_rule`), its problems
mapped to the YAML nodes they are about.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import warnings
from typing import Any

import yaml
from pydantic import ValidationError

from bridge.config.document import Document, Loc, dotted
from bridge.config.schema import RuleConfig
from bridge.rules import RuleIssue, compile_rule
from bridge.suggest import SCHEME_MEANINGS, closest


def check_unique(doc: Document, raw: dict[str, Any], section: str) -> None:
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
                f"{section}[{i}].name: duplicate name '{name}' (first at line {line}; "
                "names must be unique)",
            )
        else:
            first[name] = i


class _ThreadFilter(logging.Filter):
    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def _scheme_hint(scheme: str, schemes: Any) -> str:
    if scheme.lower() in ("http", "https"):
        return " (for a plain HTTP endpoint write webhook: URL instead of an apprise URL)"
    found = closest(scheme.lower(), sorted(schemes.schemas()), SCHEME_MEANINGS)
    return f" (did you mean '{found}://'?)" if found else ""


def apprise_problem(url: str) -> str | None:
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
                shown = scheme if len(scheme) <= 20 else scheme[:17] + "..."
                return f"unknown apprise scheme '{shown}://'{_scheme_hint(scheme, schemes)}"
            ok = apprise.Apprise().add(url)
    finally:
        logger.removeFilter(quiet)
    return None if ok else f"apprise cannot use this {scheme}:// URL (check its tokens and options)"


def check_targets(doc: Document, raw: dict[str, Any]) -> None:
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
        if webhook is None and isinstance(url, str) and (problem := apprise_problem(url)):
            doc.add(doc.at(url_loc), f"{dotted(loc)}: {problem}")
        if isinstance(secret, str) and secret.startswith("whsec_"):
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                doc.add(doc.at((*loc, "secret")), f"{dotted(loc)}.secret: the part after "
                        "whsec_ is not valid base64")  # fmt: skip


def check_rules(doc: Document, raw: dict[str, Any]) -> None:
    """Each rule whose shape the schema accepts is compiled; its problems get positions."""
    source_list = raw.get("sources")
    sources = [
        s["name"]
        for s in (source_list if isinstance(source_list, list) else [])
        if isinstance(s, dict) and isinstance(s.get("name"), str)
    ]
    targets = raw.get("targets", {})  # no targets section: every name a rule sends to is unknown
    names = list(targets) if isinstance(targets, dict) else None
    rule_list = raw.get("rules")
    for i, rule in enumerate(rule_list if isinstance(rule_list, list) else []):
        if not isinstance(rule, dict):
            continue
        config, skip = _rule_shape(rule)
        for issue in compile_rule(config, names, sources)[1] if config else []:
            if issue.path[0] not in skip:
                _rule_problem(doc, ("rules", i), issue)


def _rule_shape(rule: dict[str, Any]) -> tuple[RuleConfig | None, set[str | int]]:
    """The rule as the schema reads it; when some keys are refused (reported by the schema),
    the rule without them, so the rest is still checked. Also the keys not to check again."""
    try:
        return RuleConfig.model_validate(rule), set()
    except ValidationError as exc:
        bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
    kept = {k: v for k, v in rule.items() if k not in bad}
    skip = bad | {k for k in ("name", "to") if k not in kept}
    try:
        return RuleConfig.model_validate({"name": "", "to": [], **kept}), skip
    except ValidationError:
        return None, skip


def _rule_problem(doc: Document, rule: Loc, issue: RuleIssue) -> None:
    loc = (*rule, *issue.path)
    label = (*rule, *(p for p in issue.path if isinstance(p, str)))
    text = f"{dotted(label[:-1] if issue.key else label)}: {issue.message}"
    node = doc.key_at(loc) if issue.key else doc.at(loc)
    if issue.line and isinstance(node, yaml.ScalarNode) and node.style == "|":
        # A literal block's content starts on the line after `|`, one template line per line.
        line = node.start_mark.line + issue.line
        if line < len(doc.line_starts):
            start = doc.line_starts[line]
            end = doc.text.find("\n", start)
            content = doc.text[start : end if end >= 0 else len(doc.text)]
            doc.add(start + len(content) - len(content.lstrip(" ")), text)
            return
    doc.add(node, text)

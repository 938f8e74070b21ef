"""Problems in plain words: YAML syntax errors mapped to the mistake a person made (indentation,
a tab, a value that needs quotes, a missing space after `:`), and pydantic's errors to what a
valid value looks like. Every message names the fix; none echoes a value the user did not write.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic_core import ErrorDetails

from bridge.config.document import LIBYAML, Document, Loc, dotted, too_deep
from bridge.errors import Problem

# --- YAML syntax ---------------------------------------------------------------------------------

_QUOTE = "put the whole value in quotes"
_NO_SPACE = re.compile(r"^(\s*(?:-\s+)?)([A-Za-z_][\w.-]*):(?=[^\s:/])")
_VALUE = re.compile(r"^\s*(?:-\s+)?[^\s:#'\"][^:#]*?:\s+(?P<value>\S.*?)\s*$")


def _line(text: str, line: int) -> str:
    lines = text.split("\n")
    return lines[line] if 0 <= line < len(lines) else ""


def _missing_space(text: str, line: int) -> tuple[int, int, str] | None:
    """A `key:value` on this line or the one before (0-based); (line, column, key) 1-based."""
    for number in (line, line - 1):
        if m := _NO_SPACE.match(_line(text, number)):
            return number + 1, m.end(2) + 1, m[2]
    return None


def _value_hint(value: str) -> str | None:
    """Why an unquoted value broke the YAML, from how it starts or what it holds."""
    first = value[:1]
    if value.startswith(("{{", "{%")):
        return (f"a template at the start of a value is read as a mapping: {_QUOTE}, "
                'e.g. title: "{{ task.action }} failed"')  # fmt: skip
    if first in ("[", "{"):
        return (
            f"a value starting with {first} is read as a list or mapping: if it is text, {_QUOTE}"
        )
    if first == "*":
        return f'a value starting with * is read as an alias: {_QUOTE}, e.g. on: "*.failed"'
    if first == "&":
        return f"a value starting with & is read as an anchor: {_QUOTE}"
    if first and first in "%@`":
        return f"a value cannot start with {first} unless quoted: {_QUOTE}"
    if ": " in value or value.endswith(":"):
        return (f"this value holds ': ', which YAML reads as a new key: {_QUOTE}, "
                'e.g. title: "Failed: {{ task.prompt }}"')  # fmt: skip
    return None


def yaml_problem(doc: Document, exc: yaml.YAMLError) -> None:
    """One problem for a YAML error, at its real position, saying what to change."""
    if isinstance(exc, yaml.reader.ReaderError):
        at = exc.position
        if LIBYAML:  # libyaml counts bytes of UTF-8
            at = len(doc.text.encode()[:at].decode(errors="ignore"))
        line, column = doc.position(at)
        char = exc.character
        code = f"U+{char:04X}" if isinstance(char, int) else f"U+{ord(char[:1] or '?'):04X}"
        message = (
            f"invalid YAML: the control character {code} cannot appear in a YAML file "
            '(delete it; write \\t or \\n inside "double quotes" if you meant one)'
        )
        doc.problems.append(Problem(doc.file, line, column, message))
        return
    if not isinstance(exc, yaml.MarkedYAMLError):
        doc.problems.append(Problem(doc.file, 1, 1, f"invalid YAML: {exc}"))
        return
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line, mark.column) if mark else (0, 0)
    problem, context = str(exc.problem or ""), str(exc.context or "")
    hint: str | None = None
    if "'\\t'" in problem or _line(doc.text, line)[column : column + 1] == "\t":
        hint = "a tab: YAML indents with spaces only (replace the tab with spaces)"
    elif "too deep" in problem or "once aliases are expanded" in problem:
        hint = problem
    elif "maximum nesting depth" in problem:
        hint = too_deep()
    elif context.startswith("while scanning a quoted scalar") and exc.context_mark:
        start = exc.context_mark
        line, column = start.line, start.column
        hint = "this quote is never closed (end the value with the same quote it starts with)"
    elif "undefined alias" in problem:
        name = problem.split("'")[1] if "'" in problem else ""
        hint = (f"*{name} refers to no anchor above it (define &{name} first, or put a value "
                "starting with * in quotes)")  # fmt: skip
    elif "while scanning an alias" in context or "while scanning an anchor" in context:
        hint = _value_hint(_value_at(doc.text, line) or "*")
    elif "that cannot start any token" in problem:
        hint = _value_hint(_value_at(doc.text, line) or "%") or f"{_QUOTE}"
    elif "mapping values are not allowed" in problem:
        if found := _missing_space(doc.text, line):
            line, column, key = found[0] - 1, found[1] - 1, found[2]
            hint = f"put a space after ':' (write {key}: value)"
        elif (value := _value_at(doc.text, line)) and (hint := _value_hint(value)):
            pass
        else:
            hint = _INDENT
    elif "could not find expected ':'" in problem:
        if found := _missing_space(doc.text, line) or _missing_space(doc.text, line - 1):
            line, column, key = found[0] - 1, found[1] - 1, found[2]
            hint = f"put a space after ':' (write {key}: value)"
        else:
            hint = ("a key here has no ':' after it (write key: value), or a value runs onto "
                    f"the next line: {_QUOTE}")  # fmt: skip
    elif "found unhashable key" in problem:
        hint = _value_hint(_value_at(doc.text, line) or "{{")
    elif any(m in problem for m in _BLOCK_END):
        value = _value_at(doc.text, line)
        hint = (_value_hint(value) if value else None) or _INDENT
    elif context.startswith("while parsing a flow"):
        hint = ("a list [a, b] or mapping {k: v} written on one line needs commas and its "
                f"closing bracket; if the value is text, {_QUOTE}")  # fmt: skip
    if hint is None:
        where = f" ({context})" if context else ""
        hint = f"{problem}{where}"
    doc.problems.append(Problem(doc.file, line + 1, column + 1, f"invalid YAML: {hint}"))


# What the parsers say when a line does not fit its block (PyYAML's and libyaml's words).
_BLOCK_END = (
    "expected <block end>",
    "expected <document start>",
    "did not find expected key",
    "did not find expected '-' indicator",
    "did not find expected <document start>",
)
_INDENT = (
    "the indentation does not line up: indent this line with spaces exactly like the other keys "
    "of its block (the keys of one rule line up under its name:)"
)


def _value_at(text: str, line: int) -> str | None:
    m = _VALUE.match(_line(text, line))
    return m["value"] if m else None


# --- values the schema refuses --------------------------------------------------------------------

# What a valid value of a named field looks like, after pydantic's "expected ..." for its type.
EXAMPLES: dict[str, str] = {
    "name": ", such as my-source",
    "base_url": ", such as https://mj.example.com",
    "api_key": ", such as ${MJ_API_KEY}",
    "to": " (a target's name, or a list such as [team-slack, pipeline])",
    "on": " (an event type, or a list such as [task.failed, task.succeeded])",
    "when": ", such as {action: IMAGINE}",
    "by": ", such as [source, action]",
    "headers": ", such as {X-Team: art}",
    "enrich": ", such as [seed]",
    "tokens": ", such as [${PASSTHROUGH_TOKEN}]",
    "users": ", such as {alice: 'scrypt$...'} (make hashes with bridge hash-password)",
    "sources": " with one '- name: ...' item per source",
    "targets": " of target names to targets, such as {team-slack: 'slack://...'}",
    "rules": " with one '- name: ...' item per rule",
    "server": ", such as {listen: '127.0.0.1:8787'}",
    "group": ", such as {by: [source], wait: 30s}",
    "url": ", an apprise URL such as 'mailtos://user:pass@smtp.example.com?to=a@example.com'",
    "webhook": ", such as https://pipeline.example.com/mj-events",
    "discord": ", such as ${DISCORD_WEBHOOK}",
    "slack": ", a channel such as '#mj' or C0123456789",
    "token": ", such as ${SLACK_BOT_TOKEN}",
    "secret": ", such as ${PIPELINE_SECRET}",
    "push_token": ", such as ${MJ_PUSH_TOKEN}",
    "api_base": ", such as https://discord.com/api/v10",
    "public_url": ", such as https://bridge.example.com",
    "type_prefix": ", such as com.example.mj.",
    "nats": ", such as nats://127.0.0.1:4222",
    "amqp": ", such as amqp://user:${AMQP_PASSWORD}@127.0.0.1:5672/",
    "redis": ", such as redis://127.0.0.1:6379/0",
    "mqtt": ", such as mqtt://127.0.0.1:1883",
    "subject": ", such as 'mj.{{ source }}.{{ type }}'",
    "routing_key": ", such as '{{ source }}.{{ type }}'",
    "stream": ", such as 'mj:events'",
    "topic": ", such as 'mj/{{ source }}/{{ type }}'",
    "exchange": ", such as mj",
}
_MAPPING = "expected a mapping (key: value lines indented below the key, or {key: value})"
_TYPES: dict[str, str] = {
    "string_type": "expected text",
    "int_type": "expected a whole number, such as 8",
    "int_parsing": "expected a whole number, such as 8",
    "int_from_float": "expected a whole number, such as 8",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "list_type": "expected a list",
    "dict_type": _MAPPING,
    "model_type": _MAPPING,
    "model_attributes_type": _MAPPING,
    "tuple_type": "expected a list",
    "byte_size": "expected a size such as 512KB or 8MiB",
    "byte_size_unit": "expected a size such as 512KB or 8MiB",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"),
    "greater_than": ("gt", "must be more than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "less_than": ("lt", "must be less than {}"),
    "too_short": ("min_length", "needs at least {} items"),
    "string_too_short": ("min_length", "must be at least {} characters long"),
    "string_too_long": ("max_length", "must be at most {} characters long"),
}


def _field(loc: Loc) -> str:
    names = [p for p in loc if isinstance(p, str)]
    return names[-1] if names else ""


def value_message(doc: Document, loc: Loc, error: ErrorDetails, value: Any) -> str:
    """The message for a value pydantic refused: the path, what is wrong, what valid looks like."""
    kind = error["type"]
    field = _field(loc)
    ctx = error.get("ctx", {})
    if kind in _TYPES and isinstance(value, str) and (m := _NO_SPACE.match(value)):
        return f"{dotted(loc)}: put a space after ':' (write {m[2]}: value)"
    if kind in _TYPES:
        text = _TYPES[kind]
        example = EXAMPLES.get(field) if not isinstance(loc[-1], int) else None
        if field == "name" and loc[:1] == ("rules",):
            example = ", such as failures"
        if "such as" not in text and example:
            text += example
        if kind == "string_type" and isinstance(value, bool | int | float):
            text += " (put it in quotes)"
        return f"{dotted(loc)}: {text}"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return f"{dotted(loc)}: must not be empty"
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, text = _BOUNDS[kind]
        return f"{dotted(loc)}: {text.format(ctx[key])}"
    if kind == "string_pattern_mismatch" and field == "name":
        return f"{dotted(loc)}: use lowercase letters, digits, _ and - only, such as my-source"
    if kind == "literal_error":
        return f"{dotted(loc)}: write one of {ctx.get('expected', '')}"
    # pydantic's other messages name the expected shape, never the input value.
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{dotted(loc)}: {message}"

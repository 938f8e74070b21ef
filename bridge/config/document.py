"""Reading rules.yaml: YAML 1.2 within bounds (size, nesting, values after aliases), plain values
only (no tags that build objects), `${VAR}` substituted per scalar, and the node behind every path
remembered so a problem points at FILE:LINE:COL.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from bridge.errors import Problem

MAX_BYTES = 1024 * 1024  # a rules file is a few KB; 1 MiB leaves room for long templates
MAX_DEPTH = 64  # nesting levels; real files use fewer than 10
MAX_VALUES = 100_000  # values after expanding aliases: a 500-byte alias bomb stops here

_YAML = "tag:yaml.org,2002:"
_BOOL, _MERGE = _YAML + "bool", _YAML + "merge"
# The plain values a rules file holds. Anything else (!!python/..., !!timestamp, !!binary, !!set,
# a local !tag) is refused: it would build objects the schema does not know, or run code.
PLAIN_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_WHAT = {"int": "a whole number", "float": "a number", "bool": "true or false"}

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Loc = tuple[str | int, ...]


class TooBig(Exception):
    """The document exceeds a bound; `loc` is where, `message` says which."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class _Plain(Composer, SafeConstructor, Resolver):
    """YAML 1.2 scalars: only true/false are booleans (`on:` is a key; yes/no/on/off are text) and
    dates stay text. Composing counts depth and values, so a hostile file stops early."""

    def __init__(self) -> None:
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.depth = 0
        self.values = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        self.values += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise yaml.composer.ComposerError(None, None, too_deep(), mark)
            if self.values > MAX_VALUES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise yaml.composer.ComposerError(None, None, _too_many(), mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Plain.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_BOOL, _YAML + "timestamp", _YAML + "value")
    ]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}
_Plain.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

# libyaml's parser (C) when PyYAML has it: about six times faster on a large file than the pure
# Python one. Either way the nodes are composed here, with the bounds above.
try:
    from yaml._yaml import CParser as _Parser

    LIBYAML = True
except ImportError:  # a PyYAML built without libyaml
    LIBYAML = False


_PARSING: tuple[type, ...] = (_Parser,) if LIBYAML else (Reader, Scanner, Parser)


class _Loader(*_PARSING, _Plain):  # type: ignore[misc]
    def __init__(self, stream: str) -> None:
        if LIBYAML:
            _Parser.__init__(self, stream)
        else:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
        _Plain.__init__(self)


def too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep (a rules file needs fewer than 10)"


def _too_many() -> str:
    return (
        f"more than {MAX_VALUES:,} values once aliases are expanded "
        "(an alias that repeats itself? write fewer * aliases)"
    )


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree of `text`; raises yaml.YAMLError (with a mark where it can)."""
    loader = _Loader(text)
    try:
        # Composer's, not CParser's own: that one composes in C, without the bounds.
        return Composer.get_single_node(loader)
    finally:
        loader.dispose()


def tag_name(tag: str) -> str:
    name = "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag
    return name if len(name) <= 40 else name[:37] + "..."


def env_value(name: str, default: str | None, env: dict[str, str]) -> str | None:
    """`${VAR:-default}` as in the shell: the default when VAR is unset or empty."""
    value = env.get(name)
    if value:
        return value
    if default is not None:
        return default
    return value


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


class Document:
    """One rules.yaml being read: builds plain Python data from the composed YAML, substitutes
    `${VAR}` per scalar, and remembers the node behind every path so problems point at it."""

    def __init__(self, file: str, text: str, env: dict[str, str]) -> None:
        self.file = file
        self.text = text
        self.env = env
        self.problems: list[Problem] = []
        self.nodes: dict[Loc, yaml.Node] = {}
        self.keys: dict[Loc, yaml.Node] = {}
        # Nodes whose value could not be read (a missing ${VAR}, a refused tag): the problem
        # said there is the one to fix, so follow-on problems at the same place are dropped.
        self.unread: set[tuple[int, int]] = set()
        self.primary: list[Problem] = []
        # What a value from ${VAR} became -> how messages show it instead (the variable's name).
        self.hidden: dict[str, str] = {}
        self.from_env: dict[tuple[int, int], str] = {}  # node position -> its text with ${VAR}
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self._constructor = _Plain()
        self._values = 0
        self._open: set[int] = set()  # ids of the collections being built (alias cycles)

    # positions
    def add(self, where: yaml.Node | int, message: str) -> None:
        if isinstance(where, int):
            line, column = self.position(where)
        else:
            line, column = where.start_mark.line + 1, where.start_mark.column + 1
        self.problems.append(Problem(self.file, line, column, message))

    def add_unread(self, node: yaml.Node, where: yaml.Node | int, message: str) -> None:
        self.add(where, message)
        self.primary.append(self.problems[-1])
        self.unread.add((node.start_mark.line + 1, node.start_mark.column + 1))

    def position(self, index: int) -> tuple[int, int]:
        """1-based line and column of a character index in the text."""
        line = bisect.bisect_right(self.line_starts, index) - 1
        return line + 1, index - self.line_starts[line] + 1

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
        self._values += 1
        if self._values > MAX_VALUES:
            raise TooBig(loc, _too_many())
        if len(loc) > MAX_DEPTH or id(node) in self._open:
            raise TooBig(loc, too_deep() if len(loc) > MAX_DEPTH else "an alias inside its own "
                         "anchor repeats forever (point * at an anchor outside it)")  # fmt: skip
        self.nodes.setdefault(loc, node)
        if node.tag not in PLAIN_TAGS and not node.tag.startswith(_YAML + "merge"):
            self.add_unread(node, node, f"{dotted(loc)}: the tag {tag_name(node.tag)} is not "
                            "supported: this file holds plain values (remove the tag)")  # fmt: skip
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if isinstance(node, yaml.MappingNode) and self.text.startswith("{{", node.start_mark.index):
            # `title: {{ task.action }}` is a mapping in a mapping to YAML: a template unquoted.
            self.add_unread(node, node, f"{dotted(loc)}: a template at the start of a value "
                            "is read as a mapping: put the whole value in quotes, e.g. "
                            "title: \"{{ task.action }} failed\"")  # fmt: skip
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        finally:
            self._open.discard(id(node))

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
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in PLAIN_TAGS:
                self.add(key_node, f"{dotted(loc)}: a key must be a plain name")
                continue
            key = str(key_node.value)
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.add(key_node, f"{dotted((*loc, key))}: duplicate key (first at line {first}; "
                         "keep one)")  # fmt: skip
                continue
            seen[key] = key_node
            self.keys[(*loc, key)] = key_node
            out[key] = self.build(value_node, (*loc, key))
        for merged in merges:
            if not isinstance(merged, yaml.MappingNode):
                self.add(merged, f"{dotted(loc)}: << merges a mapping only")
                continue
            for key_node, value_node in merged.value:
                key = str(key_node.value)
                if key not in out:
                    self.keys.setdefault((*loc, key), key_node)
                    out[key] = self.build(value_node, (*loc, key))
        return out

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        value = str(node.value)
        if "${" in value:
            # A substituted value stays text (pydantic reads "8" as 8 and "false" as false where
            # a field wants them), so an api key of digits is never turned into a number.
            result = _ENV.sub(lambda m: self._variable(node, m), value)
            if result != value:
                self._hide(result, value)
                self.from_env[(node.start_mark.line + 1, node.start_mark.column + 1)] = value
            return result
        try:
            return self._constructor.construct_object(node)
        except Exception:  # int("x") for `!!int x`, a 5,000-digit number, `!!bool maybe`
            kind = node.tag.removeprefix(_YAML)
            what = _WHAT.get(kind)
            fix = f"write {what}" if what else "remove the tag"
            self.add_unread(node, node, f"{dotted(loc)}: cannot read this value as "
                            f"{tag_name(node.tag)} ({fix}, or put text in quotes)")  # fmt: skip
            return None

    def _variable(self, node: yaml.Node, m: re.Match[str]) -> str:
        value = env_value(m[1], m[2], self.env)
        if value is None:
            found = self.text.find(m[0], node.start_mark.index, node.end_mark.index)
            self.add_unread(node, found if found >= 0 else node, f"environment variable {m[1]} "
                            "is not set and has no default (write ${" + m[1] + ":-default} for "
                            "one)")  # fmt: skip
            return ""
        if m[1] in self.env and value == self.env[m[1]]:
            self._hide(value, "${" + m[1] + "}")
        return value

    def _hide(self, value: str, shown_as: str) -> None:
        self.hidden[value] = shown_as

    def scrub(self, problem: Problem) -> Problem:
        """`problem` without any value that came from `${VAR}`: the variable is named instead."""
        from bridge.config.values import shown

        message = problem.message

        for value in sorted(self.hidden, key=len, reverse=True):
            name = self.hidden[value]
            message = message.replace(shown(value), shown(name))
            message = message.replace(f"'{value}'", f"'{name}'").replace(f'"{value}"', f'"{name}"')
            if len(value) >= 6:  # shorter ones would match ordinary words of a message
                message = message.replace(value, name)
        original = self.from_env.get((problem.line, problem.column))
        if original and problem not in self.primary and shown(original)[1:-1] not in message:
            message += f" (the value comes from {shown(original)[1:-1]})"
        return Problem(problem.file, problem.line, problem.column, message)

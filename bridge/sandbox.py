"""Rules stage: the Jinja sandbox templates.py renders in, bounded in work, memory and output.
Rendering runs on the event loop, so a template must not be able to hold it: every render gets a
Budget, and the sandbox charges it at each place a template can do work or grow a value.

- Work: every loop iteration, call, filter and test is a step (MAX_STEPS per render); the thread's
  CPU time is looked at every 256 steps (MAX_SECONDS). Nested `range(100000)` loops stop after
  MAX_STEPS iterations, a few milliseconds, instead of pinning the loop for hours.
- Memory: every value a call, filter, operator or `~` makes is charged by its size (MAX_ALLOC per
  render), and operations that multiply (`*`, `**`, `%`, widths such as `center(10**9)`, `join`,
  `replace`, `indent`) are charged before they run, so a bomb is refused, not built.
- Output: every expression written, and the literal text of a loop's or macro's body each time it
  runs, counts towards MAX_OUTPUT per field; the whole text is checked against it at the end.
- Nothing huge is folded at compile time: the operators and filters that could build a huge
  constant refuse to run without a budget, so Jinja leaves them for render time and `bridge check`
  of `{{ 'a' * 10**9 }}` stays small and fast.

A template over a limit raises TemplateLimit, which says which limit; rules/ turns it into a dead
letter for that rule's deliveries. Why not render off the loop with a deadline: a thread cannot be
stopped (the runaway render would keep its CPU and its memory, and the next one would start another
thread), and a process per render would cost the hot path a fork or a pickled event each time.
"""

from __future__ import annotations

import functools
import math
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextvars import ContextVar
from typing import Any

from jinja2 import Template, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg
from jinja2.visitor import NodeTransformer

__all__ = ["MAX_OUTPUT", "MAX_STEPS", "BoundedEnvironment", "TemplateLimit"]

MAX_STEPS = 20_000  # loop iterations, calls, filters and tests per render
MAX_SECONDS = 0.5  # CPU seconds per render (a backstop: steps stop nearly everything first)
MAX_OUTPUT = 64 * 1024  # characters written per field (a title, a body)
MAX_ALLOC = 8 * 1024 * 1024  # characters/items of all the values one render makes
MAX_INT_BITS = 4096  # integers a template computes (10**9 is fine, 10**10**6 is not)
_CLOCK_EVERY = 256


class TemplateLimit(ValueError):
    """A template went over one of the sandbox's limits. A ValueError, so that the brokers'
    name templates (topics.py) report it as they report any name they cannot use."""


class Budget:
    __slots__ = ("alloc", "output", "started", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.alloc = 0
        self.output = 0
        self.started = time.thread_time()

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(
                f"more than {MAX_STEPS:,} steps (loop iterations, calls and filters)"
            )
        if self.steps % _CLOCK_EVERY == 0 and time.thread_time() - self.started > MAX_SECONDS:
            raise TemplateLimit(f"more than {MAX_SECONDS:g}s of CPU time")

    def charge(self, size: int) -> None:
        self.alloc += size
        if self.alloc > MAX_ALLOC:
            raise TemplateLimit(f"the values it makes exceed {MAX_ALLOC:,} characters")

    def write(self, size: int) -> None:
        self.output += size
        if self.output > MAX_OUTPUT:
            raise TemplateLimit(f"its output exceeds {MAX_OUTPUT:,} characters")

    @property
    def room(self) -> int:
        return MAX_ALLOC - self.alloc


_BUDGET: ContextVar[Budget | None] = ContextVar("bridge_template_budget", default=None)


def _budget() -> Budget:
    """The running render's budget. Outside a render (the compiler folding constants) there is
    none, and refusing makes the compiler leave the expression for render time."""
    budget = _BUDGET.get()
    if budget is None:
        raise TemplateLimit("not evaluated outside a render")
    return budget


def _size(value: object) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict | set) else 0


def _digits(fmt: object) -> int:
    """The largest number written in a format string (a width or precision)."""
    if not isinstance(fmt, str):
        return 0
    return max((int(n) for n in re.findall(r"\d{1,30}", fmt)), default=0)


def _estimate(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], value: bool) -> int:
    """What an operation that multiplies its input will make, before it runs. With `value`, the
    first argument is what a filter works on (its size, not a width)."""
    values = [*args, *kwargs.values()]
    if name == "join" and args:
        # filter join(value, d=""): a str's method join(items) has the separator as its self
        items = args[0] if isinstance(args[0], Sized) and not isinstance(args[0], str) else ()
        sep = args[1] if len(args) > 1 else kwargs.get("d", "")
        if isinstance(items, Iterable):
            count = len(items)
            return sum(_size(i) or 20 for i in items) + _size(sep) * count
    if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        text, old, new = args[:3]
        return len(text) + (text.count(old) if old else len(text) + 1) * len(new)
    if name == "indent" and args and isinstance(args[0], str):
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        return len(args[0]) + (args[0].count("\n") + 1) * (_size(width) or _int(width))
    if name in ("format", "format_map"):
        return max((_digits(v) or _int(v) for v in values), default=0)
    if name == "tojson":  # every line repeats the indent once per level: more than 16 is a bomb
        indent = _int(args[1] if len(args) > 1 else kwargs.get("indent"))
        return indent * MAX_ALLOC if indent > 16 else 0
    return max((_int(v) for v in values[1 if value else 0 :]), default=0)


def _int(value: object) -> int:
    return abs(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _guard(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, value: bool = False
) -> Budget:
    budget = _budget()
    budget.step()
    need = _estimate(name, args, kwargs, value)
    if need > budget.room:
        raise TemplateLimit(
            f"{name}(...) would make about {need:,} characters, more than the "
            f"{MAX_ALLOC:,} a render may make"
        )
    return budget


def _bounded(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter or test that charges the budget: a step, its estimated size, its result."""
    skip = 1 if _PassArg.from_obj(func) is not None else 0  # context/environment first
    plain = skip + 1  # the arguments of a filter given no arguments of its own
    special = name in _MULTIPLIERS

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= plain and not kwargs and not special:
            budget = _BUDGET.get()  # the common case, `x | upper`: nothing to estimate
            if budget is None:
                raise TemplateLimit("not evaluated outside a render")
            budget.step()
        else:
            if name == "join" and len(args) > skip and not isinstance(args[skip], Sized):
                args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # count the items
            budget = _guard(name, args[skip:], kwargs, value=True)
        result = func(*args, **kwargs)
        if type(result) is str:
            budget.charge(len(result))
        elif type(result) is not bool:
            budget.charge(_size(result))
        return result

    return bounded


_MULTIPLIERS = frozenset({"join", "replace", "indent", "format", "format_map", "tojson"})


def _binop(op: str, left: Any, right: Any) -> Any:
    budget = _budget()
    budget.step()
    if op == "**" and isinstance(right, int | float) and isinstance(left, int | float):
        if abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise TemplateLimit(f"{left!r} ** {right!r} is larger than {MAX_INT_BITS} bits")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"a product larger than {MAX_INT_BITS} bits")
        else:
            count = _int(left) or _int(right)
            need = (_size(left) or _size(right)) * count
            if need > budget.room:
                raise TemplateLimit(f"a repetition of {need:,} characters")
    elif op == "+":
        if _size(left) + _size(right) > budget.room:
            raise TemplateLimit(f"a concatenation beyond {MAX_ALLOC:,} characters")
    elif op == "%" and isinstance(left, str) and _digits(left) > budget.room:
        raise TemplateLimit(f"a format width beyond {MAX_ALLOC:,} characters")
    result = _BINOPS[op](left, right)
    budget.charge(_size(result))
    return result


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": operator.mul,
    "**": operator.pow,
    "+": operator.add,
    "%": operator.mod,
}


def _each(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's iterable, one step per item."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _concat(parts: list[Any]) -> str:
    """`a ~ b ~ c`, charged before it is built."""
    texts = [str(p) for p in parts]
    need = sum(len(t) for t in texts)
    budget = _budget()
    if need > budget.room:
        raise TemplateLimit(f"a ~ concatenation beyond {MAX_ALLOC:,} characters")
    budget.charge(need)
    return "".join(texts)


def _charge(size: int) -> str:
    """The literal text of a loop's, macro's or call block's body, once per time it runs."""
    _budget().write(size)
    return ""


def _finalize(value: Any) -> Any:
    """Every expression written: counted against MAX_OUTPUT (Jinja makes it a str after)."""
    budget = _BUDGET.get()
    if budget is None:
        raise TemplateLimit("not evaluated outside a render")
    budget.write(len(value) if type(value) is str else len(str(value)))
    return value


def _literal(body: list[nodes.Node]) -> int:
    return sum(len(n.data) for node in body for n in node.find_all(nodes.TemplateData))


def _charging(body: list[nodes.Node], lineno: int) -> list[nodes.Node]:
    """`body` that first charges the output of its own literal text (counted once when it is
    compiled, so that literal text is not run through the budget piece by piece)."""
    size = _literal(body)
    if not size:
        return body
    charge = nodes.Filter(nodes.Const(size), "_charge", [], [], None, None, lineno=lineno)
    return [nodes.ExprStmt(charge, lineno=lineno), *body]


class _Instrument(NodeTransformer):
    """Routes loops, `~` and the literal text of repeated bodies through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_each", [], [], None, None, lineno=node.lineno)
        node.body = _charging(node.body, node.lineno)
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        self.generic_visit(node)
        node.body = _charging(node.body, node.lineno)
        return node

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        self.generic_visit(node)
        node.body = _charging(node.body, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        items = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(items, "_concat", [], [], None, None, lineno=node.lineno)


class BoundedTemplate(Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        """As Jinja's, within a fresh Budget (a render inside a render shares the outer one)."""
        if _BUDGET.get() is not None:
            return super().render(*args, **kwargs)
        token = _BUDGET.set(Budget())
        try:
            text = super().render(*args, **kwargs)
        finally:
            _BUDGET.reset(token)
        if len(text) > MAX_OUTPUT:  # the literal text outside loops is counted here
            raise TemplateLimit(f"its output exceeds {MAX_OUTPUT:,} characters")
        return text


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the budget's hooks; `bound_filters()` after adding filters."""

    template_class = BoundedTemplate
    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters.update(_each=_each, _concat=_concat, _charge=_charge)
        del self.globals["lipsum"]  # text by the paragraph: nothing a notification needs

    def bound_filters(self) -> None:
        """Wrap every filter and test so that it charges the budget (call once, after adding
        the bridge's own filters)."""
        internal = {"_each", "_concat", "_charge"}
        for name, func in list(self.filters.items()):
            if name not in internal:
                self.filters[name] = _bounded(name, func)
        for name, test in list(self.tests.items()):
            self.tests[name] = _bounded(name, test)  # type: ignore[arg-type]

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        instrumented = _Instrument().visit(tree)
        assert isinstance(instrumented, nodes.Template)
        return instrumented

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return _binop(operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        # str.format comes wrapped by the sandbox (its SandboxedFormatter); the string is the
        # wrapped method's self.
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str) and name in ("join", "replace", "format", "format_map"):
            if name == "join" and args and not isinstance(args[0], Sized):
                args = (list(args[0]), *args[1:])  # count what is joined
            checked = (args[0], owner) if name == "join" and args else (owner, *args)
            budget = _guard(name, checked, {} if name == "join" else kwargs, value=True)
        else:
            budget = _guard(name or "a call", args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.charge(_size(result))
        return result

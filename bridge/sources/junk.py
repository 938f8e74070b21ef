"""Junk rows met by the requests of one poll. Pipeline: **source** -> snapshot -> diff.

Rows without a usable id (`{"id": null}`, `{"foo": 1}`) or with a progress that is not a finite
number are junk, not tasks (normalize.py). An answer of junk only is a bad payload
(UnusableRows): the poll fails and counts towards source.down. An answer with some junk is used,
but a poll that met any (its `JunkTally`) concludes nothing missing, since the junk may be the very
tasks it looked for; its junk is logged once, in one warning line and counted in metrics
(`TaskAPI.tally`). Pure: no I/O, the tally of the poll in progress in a context variable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from bridge.errors import SourceError
from bridge.sources.normalize import Dropped, Normalized

__all__ = ["JunkTally", "UnusableRows", "gather", "usable", "why"]


class UnusableRows(SourceError):
    """An answer of task rows none of which has a usable id (or, to the probe, any such row): the
    endpoint is there but serves junk now. A bad payload, never taken for an empty list."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_payload", message)


def why(reasons: Counter[str]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())


@dataclass(slots=True)
class JunkTally:
    """The rows without a usable id met by the requests of one poll: how many, why and where."""

    reasons: Counter[str] = field(default_factory=Counter)
    where: list[str] = field(default_factory=list)

    @property
    def junk(self) -> int:
        return self.reasons.total()

    def add(self, where: str, dropped: Sequence[Dropped]) -> None:
        self.reasons.update(d.reason for d in dropped)
        if where not in self.where:
            self.where.append(where)

    def describe(self) -> str:
        return f"{self.junk} unusable task row(s) ({why(self.reasons)}) from " + (
            ", ".join(self.where)
        )


_TALLY: ContextVar[JunkTally | None] = ContextVar("bridge_sources_tally", default=None)


@contextmanager
def gather(report: Callable[[JunkTally], None]) -> Iterator[JunkTally]:
    """The span of one poll: the junk rows its requests meet gather here, and `report` gets them
    when it ends without an error (a failed poll has its own line). A span inside a span is the
    outer one, which alone reports."""
    outer = _TALLY.get()
    if outer is not None:
        yield outer
        return
    tally = JunkTally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)
    report(tally)


def usable(where: str, result: Normalized) -> Normalized:
    """A list of junk only is a bad payload, never an empty list; some junk joins the tally."""
    if result.dropped:
        if not result.tasks and not result.unchanged:
            reasons = Counter(d.reason for d in result.dropped)
            raise UnusableRows(
                f"{where}: none of the {len(result.dropped)} rows is a usable task ({why(reasons)})"
            )
        tally = _TALLY.get()
        if tally is not None:
            tally.add(where, result.dropped)
    return result

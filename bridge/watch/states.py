"""The task states one source's watcher holds, and the indexes kept with them: the unfinished ids
and the tracked ids the upstream has not shown yet. Pure: the watcher (watch/__init__.py) loads
and commits them; this only keeps them in step. Pipeline: source -> snapshot -> **diff**.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from bridge.models import TaskState

__all__ = ["TaskBook"]


class TaskBook:
    """A source's task states as last loaded or committed, with `open` (the unfinished ids, kept
    without a full scan) and `fresh` (tracked ids never seen upstream yet)."""

    __slots__ = ("fresh", "open", "states")

    def __init__(self) -> None:
        self.states: dict[str, TaskState] = {}
        self.open: set[str] = set()  # ids of the unfinished tasks, kept with `states`
        self.fresh: set[str] = set()  # tracked ids never seen upstream yet

    def reset(self, states: dict[str, TaskState]) -> None:
        """Every state, as the store has them (the first load, and each leadership's)."""
        self.states = states
        self.fresh = {tid for tid, st in states.items() if placeholder(st)}
        self.open = {tid for tid, st in states.items() if not st.finished}

    def merge(self, unfinished: Mapping[str, TaskState]) -> None:
        """The unfinished states as the store has them now: ids finished where another process
        saw them, and ids added elsewhere (another replica's push or /track, `bridge track`)."""
        for tid in self.open - unfinished.keys():  # finished where another process saw it
            self.states[tid] = replace(self.states[tid], finished=True)
            self.open.discard(tid)
            self.fresh.discard(tid)
        for tid, st in unfinished.items():
            if self.states.get(tid) != st:
                self.states[tid] = st
                self.open.add(tid)
                if placeholder(st):
                    self.fresh.add(tid)

    def new(self, ids: Iterable[str], now: float) -> dict[str, TaskState]:
        """Placeholder states for the ids not held yet (empty ones skipped), in their order."""
        new = {tid: TaskState("", -1, now) for tid in dict.fromkeys(ids) if tid}
        return {tid: st for tid, st in new.items() if tid not in self.states}

    def track(self, new: Mapping[str, TaskState]) -> None:
        """Take the placeholders a commit wrote: ids to follow, not seen upstream yet."""
        self.record(new)
        self.fresh.update(new)

    def sight(self, ids: Iterable[str]) -> tuple[Mapping[str, TaskState], set[str]]:
        """The states a snapshot of these ids is diffed against, and the tracked ids it shows for
        the first time: those are hidden, new to the diff, so it emits their state."""
        if not self.fresh:
            return self.states, set()
        sighted = self.fresh.intersection(ids)
        if not sighted:
            return self.states, sighted
        self.fresh -= sighted
        return _Hiding(self.states, sighted), sighted

    def unsight(self, ids: Iterable[str]) -> None:
        """Tracked ids sighted in rows that were then skipped: still not seen."""
        self.fresh.update(ids)

    def record(self, changed: Mapping[str, TaskState]) -> None:
        """Take the states a commit wrote; the indexes follow without a full scan."""
        self.states.update(changed)
        for tid, st in changed.items():
            if st.finished:
                self.open.discard(tid)
            else:
                self.open.add(tid)
        if self.fresh:
            self.fresh -= {tid for tid, st in changed.items() if st.finished}


def placeholder(state: TaskState) -> bool:
    """A tracked id the upstream has not shown yet (see Watcher.track)."""
    return state.status == "" and state.progress == -1 and not state.finished


class _Hiding(Mapping[str, TaskState]):
    """The states with some ids hidden: the diff sees those tasks as new."""

    __slots__ = ("_hidden", "_states")

    def __init__(self, states: Mapping[str, TaskState], hidden: set[str]) -> None:
        self._states = states
        self._hidden = hidden

    def __getitem__(self, key: str) -> TaskState:
        if key in self._hidden:
            raise KeyError(key)
        return self._states[key]

    def get(self, key: str, default: Any = None) -> Any:
        return default if key in self._hidden else self._states.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._states if k not in self._hidden)

    def __len__(self) -> int:
        return len(self._states) - len(self._hidden)

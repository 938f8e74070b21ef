"""The ways of reading one upstream (`mode:` of a source), each turning the Task Inquiry API calls
of poll.py into one Snapshot per poll. Pipeline: **source** -> snapshot -> diff -> events.

- list: GET /mj/task/list each poll, plus lookups of the tracked unfinished tasks it lacks.
- active: the full list at start and every `full_every`; in between, new and running tasks from
  /mj/task/query (unfinished page, then the newest page) or /mj/task/queue, and the tracked
  unfinished tasks they lack through list-by-condition. The work per poll follows the unfinished
  tasks, not the stored ones. Snapshots in between are partial (`complete=False`); a task that
  finished between two polls is still seen because every tracked unfinished id is looked up.
  The queue never shows a task that began and ended between two polls, so `auto` on a queue-only
  server reads the whole list each poll while it is small (SMALL_LIST tasks, measured at the
  probe and at each full read); above that such a task waits for the next full read, and the
  reader's `note` says so (the log and the status page show it).
- ids: only the tasks the bridge knows (pass-through submits, /track, push callbacks), through
  list-by-condition or, where that is missing, fetch.

Every read is one `TaskAPI.tally()`: a read that met rows without a usable id concludes no
task missing (an unusable row may be one of them), and its junk is logged once.
"""

from __future__ import annotations

from collections.abc import Collection, Container
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bridge.diff import Snapshot
from bridge.models import UNFINISHED
from bridge.sources.poll import TaskAPI

__all__ = ["ActiveReader", "IdsReader", "ListReader", "Reader"]

QUERY_PAGE = 100  # unfinished tasks per /mj/task/query page
RECENT_PAGE = 20  # newest tasks per page: catches tasks that started and ended between two polls
MAX_PAGES = 10  # pages per poll and kind; the next poll continues where this one stopped
# A queue-only server's list is read whole each poll (mode: auto) while it holds at most this many
# tasks: about 0.5-1 MB a read at midjourney-proxy's 1-2 KB a task.
SMALL_LIST = 500


class Reader(Protocol):
    mode: str
    how: str  # one line for logs: which endpoints and why

    @property
    def note(self) -> str:
        """What a user must know about this way of reading now (a delay it allows); "" if none."""
        ...

    async def read(
        self, tracked: Collection[str], known: Container[str], now: float
    ) -> Snapshot: ...


@dataclass(slots=True)
class ListReader:
    source: TaskAPI
    how: str = "GET /mj/task/list each poll"
    mode: str = "list"
    note: str = ""

    async def read(self, tracked: Collection[str], known: Container[str], now: float) -> Snapshot:
        return await self.source.poll(tracked, known)


@dataclass(slots=True)
class ActiveReader:
    source: TaskAPI
    discover: Literal["query", "queue", "list"]
    full_every: float
    how: str = ""
    mode: str = "active"
    has_list: bool = True  # False: no /mj/task/list here, so no full reads
    last_full: float | None = None
    small_list: int | None = None  # auto on a queue: read the list each poll up to this size
    push_hint: str = ""  # how push callbacks reach this source (for `note`)

    @property
    def each_poll(self) -> bool:
        """The whole list is read every poll (it is small enough, or it is the only way)."""
        if self.discover == "list":
            return True
        size = self.source.list_size
        return self.small_list is not None and size is not None and size <= self.small_list

    @property
    def note(self) -> str:
        if self.discover != "queue" or self.each_poll or not self.has_list:
            return ""
        size = self.source.list_size
        held = f"the list holds {size} tasks, " if size is not None else ""
        small = f"over {self.small_list}, " if self.small_list is not None else ""
        return (
            f"/mj/task/queue shows no task that starts and ends between two polls, and {held}"
            f"{small}too many to read each poll: such a task (a failure at once, above all) is "
            f"reported at the next full read, up to {self.full_every:g}s (full_every) late. "
            f"Push removes the delay: {self.push_hint}"
        )

    async def read(self, tracked: Collection[str], known: Container[str], now: float) -> Snapshot:
        due = self.last_full is None or now - self.last_full >= self.full_every
        if self.each_poll or (self.has_list and due):
            snapshot = await self.source.poll(tracked, known)
            self.last_full = now
            return snapshot
        with self.source.tally() as tally:
            if self.discover == "query":
                tasks = await self._query(known)
            else:
                tasks = (await self.source.queue()).tasks
            seen = {task["id"] for task in tasks}
            absent = [tid for tid in tracked if tid not in seen]
            missing: frozenset[str] = frozenset()
            if absent:
                found, missing = await self.source.lookup(absent)
                tasks = tasks + found
            return Snapshot(tasks, frozenset() if tally.junk else missing, complete=False)

    async def _query(self, known: Container[str]) -> list[dict[str, Any]]:
        """Every unfinished task (pages while they are full), then the newest pages until one
        holds a task the bridge already knows: a task that began and ended between two polls is
        in the newest page even though it is finished."""
        tasks: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            found, last = await self.source.query(UNFINISHED, page, QUERY_PAGE)
            tasks += found.tasks
            if last:
                break
        for page in range(MAX_PAGES):
            found, last = await self.source.query(None, page, RECENT_PAGE)
            tasks += found.tasks
            if last or any(task["id"] in known for task in found.tasks):
                break
        return tasks


@dataclass(slots=True)
class IdsReader:
    source: TaskAPI
    via: Literal["condition", "fetch"] = "condition"
    how: str = "POST /mj/task/list-by-condition of the tracked unfinished tasks"
    mode: str = "ids"
    note: str = ""

    async def read(self, tracked: Collection[str], known: Container[str], now: float) -> Snapshot:
        with self.source.tally():
            if not tracked:
                # Nothing to follow: one empty lookup keeps the source's health (and /readyz)
                # honest.
                if self.via == "condition":
                    await self.source.check_lookup()
                return Snapshot([], complete=False)
            if self.via == "condition":
                found, missing = await self.source.lookup(tracked)
                return Snapshot(found, missing, complete=False)
        # fetch answers one task per request: a junk answer fails the poll (bad_payload).
        tasks: list[dict[str, Any]] = []
        gone: set[str] = set()
        for tid in tracked:
            task = await self.source.fetch(tid)
            if task is None:
                gone.add(tid)
            else:
                tasks.append(task)
        return Snapshot(tasks, frozenset(gone), complete=False)

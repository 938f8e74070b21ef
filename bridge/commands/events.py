"""`bridge events tail|show` and `bridge explain --event`: reading what happened out of the store,
beside a running bridge (SQLite or PostgreSQL). The parsing lives in cli.py."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson

from bridge.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, open_for_reading, where
from bridge.errors import redact
from bridge.logs import rfc3339
from bridge.store import OutboxRow
from bridge.store.history import EventQuery, StoredEvent

FOLLOW_EVERY = 1.0  # seconds between looks for new events with -f
# With -f, events committed late with an earlier time (another replica, a long transaction) are
# still caught: each look goes this far back and skips what it already printed.
FOLLOW_SLACK = 30.0


def event_line(stored: StoredEvent) -> str:
    e = stored.event
    return f"{rfc3339(stored.time)}  {e.type:<15} {e.source:<10} {e.subject:<22} {e.id}"


def _print(stored: StoredEvent, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(stored.event.cloudevent()).decode(), flush=True)
    else:
        print(event_line(stored), flush=True)


async def tail_command(
    db: str,
    *,
    types: Sequence[str],
    source: str | None,
    task: str | None,
    count: int,
    follow: bool,
    as_json: bool,
) -> int:
    """The last `count` matching events, oldest first; with `follow`, then each new one."""
    store = await open_for_reading(db)
    if store is None:
        return EXIT_USAGE
    async with store:
        history = store.history
        query = EventQuery(types=types, source=source, task=task, limit=count)
        last = await history.events(query) if count else []
        last.reverse()
        for stored in last:
            _print(stored, as_json)
        if not follow:
            return EXIT_OK
        printed: deque[str] = deque(maxlen=10_000)
        since = time.time() - FOLLOW_SLACK
        # What is already stored is not new: only events stored from now on are printed.
        recent = await history.events(
            EventQuery(types=types, source=source, task=task, since=since, limit=10_000)
        )
        printed.extend(s.event.id for s in [*reversed(recent), *last])
        seen = set(printed)
        print("(following new events; Ctrl-C to stop)", file=sys.stderr, flush=True)
        while True:
            await asyncio.sleep(FOLLOW_EVERY)
            page = await history.events(
                EventQuery(types=types, source=source, task=task, since=since, limit=1000)
            )
            for stored in reversed(page):
                if stored.event.id in seen:
                    continue
                if len(printed) == printed.maxlen:
                    seen.discard(printed[0])
                printed.append(stored.event.id)
                seen.add(stored.event.id)
                _print(stored, as_json)
                since = max(since, stored.time - FOLLOW_SLACK)


def _delivery_line(row: OutboxRow) -> str:
    item = row.item
    error = f": {redact(item.last_error)}" if item.last_error else ""
    return (
        f"  -> {item.target}: {row.state} at {rfc3339(row.updated_at)}, "
        f"{item.attempts} attempt(s){error}"
    )


async def _read(
    db: str, event_id: str, *, deliveries: bool
) -> tuple[StoredEvent, list[OutboxRow]] | int:
    """The stored event (and its deliveries when asked), or the exit code, the reason printed:
    no database there (2), no such event (1)."""
    store = await open_for_reading(db)
    if store is None:
        return EXIT_USAGE
    async with store:
        stored = await store.history.event(event_id)
        rows = await store.history.deliveries([event_id]) if stored and deliveries else []
    if stored is None:
        print(f"bridge: no event {event_id!r} in {where(db)}", file=sys.stderr)
        return EXIT_FAILURE
    return stored, rows


async def show_command(db: str, event_id: str) -> int:
    """The stored event as CloudEvents JSON on stdout (what `bridge explain -` reads); its
    deliveries on stderr."""
    found = await _read(db, event_id, deliveries=True)
    if isinstance(found, int):
        return found
    stored, rows = found
    print(orjson.dumps(stored.event.cloudevent(), option=orjson.OPT_INDENT_2).decode())
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}", file=sys.stderr)
    for row in rows:
        print(_delivery_line(row), file=sys.stderr)
    return EXIT_OK


async def stored_event(db: str, event_id: str) -> dict[str, Any] | None:
    """`bridge explain --event ID`: the event's CloudEvents JSON, None when there is none."""
    found = await _read(db, event_id, deliveries=False)
    return None if isinstance(found, int) else found[0].event.cloudevent()

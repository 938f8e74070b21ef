"""`bridge events tail|show`, `bridge explain --event` and `bridge dlq list`: reading what happened
out of the store, beside a running bridge (SQLite or PostgreSQL). The parsing lives in cli.py."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.errors import redact
from bridge.store import OutboxRow, Store, is_postgres
from bridge.store.history import EventQuery, StoredEvent

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
FOLLOW_EVERY = 1.0  # seconds between looks for new events with -f
# With -f, events committed late with an earlier time (another replica, a long transaction) are
# still caught: each look goes this far back and skips what it already printed.
FOLLOW_SLACK = 30.0
DLQ_LIMIT = 1000


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def open_for_reading(db: str) -> Store | None:
    """The store, read-only (nothing a running bridge holds is touched), or None (a message
    printed) when `db` names no SQLite file."""
    if not is_postgres(db) and not await asyncio.to_thread(Path(db).exists):
        print(f"bridge: {db}: no such database (set --db or BRIDGE_DB)", file=sys.stderr)
        return None
    return await Store.open(db, readonly=True)


# -- events ---------------------------------------------------------------------------------------


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


async def show_command(db: str, event_id: str) -> int:
    """The stored event as CloudEvents JSON on stdout (what `bridge explain -` reads); its
    deliveries on stderr."""
    store = await open_for_reading(db)
    if store is None:
        return EXIT_USAGE
    async with store:
        stored = await store.history.event(event_id)
        if stored is None:
            print(f"bridge: no event {event_id!r} in {_where(db)}", file=sys.stderr)
            return EXIT_FAILURE
        rows = await store.history.deliveries([event_id])
    print(orjson.dumps(stored.event.cloudevent(), option=orjson.OPT_INDENT_2).decode())
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}", file=sys.stderr)
    for row in rows:
        print(_delivery_line(row), file=sys.stderr)
    return EXIT_OK


async def stored_event(db: str, event_id: str) -> dict[str, Any] | None:
    """`bridge explain --event ID`: the event's CloudEvents JSON, None when there is none."""
    store = await open_for_reading(db)
    if store is None:
        return None
    async with store:
        stored = await store.history.event(event_id)
    if stored is None:
        print(f"bridge: no event {event_id!r} in {_where(db)}", file=sys.stderr)
        return None
    return stored.event.cloudevent()


def _where(db: str) -> str:
    return "the PostgreSQL database" if is_postgres(db) else db


# -- dead letters ---------------------------------------------------------------------------------

_COLUMNS = ("ID", "TARGET", "EVENT", "TASK", "CREATED", "DIED", "ATTEMPTS", "LAST ERROR")
_ERROR_WIDTH = 80


def _cell(text: str, width: int | None = None) -> str:
    text = " ".join(text.split())  # one line per row, whatever the error said
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def dead_letter_json(row: OutboxRow, redactor: Callable[[str], str] = redact) -> dict[str, Any]:
    item, event = row.item, row.item.event
    return {
        "id": item.id,
        "target": item.target,
        "rule": item.rule,
        "event_id": event.id,
        "event_type": event.type,
        "source": event.source,
        "task": event.subject,
        "attempts": item.attempts,
        "created_at": rfc3339(item.created_at),
        "died_at": rfc3339(row.updated_at),
        "last_error": redactor(item.last_error or ""),
    }


def format_dead_letters(rows: Sequence[OutboxRow], redactor: Callable[[str], str] = redact) -> str:
    """A plain-text table: id, target, event type, task, when created and when it died
    (UTC), attempts, last error (through `redactor`: pass the app's Redactor to hide configured
    secrets too)."""
    if not rows:
        return "no dead letters"
    cells = [
        (
            row.item.id,
            row.item.target,
            row.item.event.type,
            row.item.event.subject,
            rfc3339(row.item.created_at)[:19] + "Z",
            rfc3339(row.updated_at)[:19] + "Z",
            str(row.item.attempts),
            _cell(redactor(row.item.last_error or ""), _ERROR_WIDTH),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in (_COLUMNS, *cells)) for i in range(len(_COLUMNS))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    footer = f"{len(rows)} dead letter{'s' if len(rows) != 1 else ''}"
    return "\n".join([line(_COLUMNS), *(line(r) for r in cells), footer])


async def dlq_list_command(db: str, target: str | None, as_json: bool) -> int:
    store = await open_for_reading(db)
    if store is None:
        return EXIT_USAGE
    async with store:
        rows = await store.history.dead(target, DLQ_LIMIT)
    if as_json:
        print(orjson.dumps([dead_letter_json(r) for r in rows]).decode())
        return EXIT_OK
    print(format_dead_letters(rows))
    if len(rows) == DLQ_LIMIT:
        print(f"(showing the latest {DLQ_LIMIT})")
    return EXIT_OK

"""`bridge dlq list` (read-only, beside a running bridge) and `bridge dlq replay ID... | --all`
(dead letters back in the outbox). The argument parsing lives in cli.py."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from bridge.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, open_for_reading
from bridge.errors import redact
from bridge.logs import rfc3339
from bridge.store import OutboxRow

LIMIT = 1000  # dead letters listed at most, newest first


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


async def list_command(db: str, target: str | None, as_json: bool) -> int:
    store = await open_for_reading(db)
    if store is None:
        return EXIT_USAGE
    async with store:
        rows = await store.history.dead(target, LIMIT)
    if as_json:
        print(orjson.dumps([dead_letter_json(r) for r in rows]).decode())
        return EXIT_OK
    print(format_dead_letters(rows))
    if len(rows) == LIMIT:
        print(f"(showing the latest {LIMIT})")
    return EXIT_OK


async def replay_command(db: str, ids: Sequence[str], replay_all: bool) -> int:
    """`bridge dlq replay ID... | --all`: the dead letters back in the outbox, due now."""
    if not ids and not replay_all:
        print("bridge: dlq replay needs dead letter IDs (see bridge dlq list), or --all to "
              "replay every one", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if ids and replay_all:
        print("bridge: dlq replay takes dead letter IDs or --all, not both", file=sys.stderr)
        return EXIT_USAGE
    store = await open_for_reading(db, readonly=False)
    if store is None:
        return EXIT_USAGE
    async with store:
        if replay_all:
            count = await store.replay(None)
            print(f"replayed {count} dead letter{'s' if count != 1 else ''}")
            return EXIT_OK
        missing = [i for i in ids if not await store.replay([i])]
        replayed = len(ids) - len(missing)
        print(f"replayed {replayed} dead letter{'s' if replayed != 1 else ''}")
        if missing:
            print(f"bridge: not dead letters: {', '.join(missing)}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK

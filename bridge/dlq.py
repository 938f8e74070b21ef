"""Dead letters and test sends for the CLI: `bridge dlq list` prints `format_dead_letters`,
`bridge send-test TARGET` calls `send_test`. The argument parsing lives in cli.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aiohttp

from bridge.config import TargetConfig
from bridge.errors import DeliveryError, redact
from bridge.models import Event, event_id
from bridge.store import OutboxItem
from bridge.targets import build_target

_COLUMNS = ("ID", "TARGET", "EVENT", "SUBJECT", "ATTEMPTS", "LAST ERROR")
_ERROR_WIDTH = 80


def _cell(text: str, width: int | None = None) -> str:
    text = " ".join(text.split())  # one line per row, whatever the error said
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def format_dead_letters(
    items: Sequence[OutboxItem], redactor: Callable[[str], str] = redact
) -> str:
    """A plain-text table of dead letters: id, target, event type, subject, attempts, last error.
    Errors go through `redactor` (pass the app's Redactor to hide configured secrets too)."""
    if not items:
        return "no dead letters"
    rows = [
        (
            item.id,
            item.target,
            item.event.type,
            item.event.subject,
            str(item.attempts),
            _cell(redactor(item.last_error or ""), _ERROR_WIDTH),
        )
        for item in items
    ]
    widths = [max(len(row[i]) for row in (_COLUMNS, *rows)) for i in range(len(_COLUMNS))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    footer = f"{len(items)} dead letter{'s' if len(items) != 1 else ''}"
    return "\n".join([line(_COLUMNS), *(line(r) for r in rows), footer])


def sample_item(target: str, now: float | None = None) -> OutboxItem:
    """The delivery `send-test` sends: a `bridge.test` event with a fresh id each time."""
    now = time.time() if now is None else now
    when = datetime.fromtimestamp(now, UTC)
    event = Event(
        id=event_id("send-test", target, now),
        type="bridge.test",
        source="bridge",
        subject="send-test",
        time=when,
        data={"message": f"test notification from mj-bridge to {target}"},
    )
    return OutboxItem(
        id=f"{event.id}:{target}",
        target=target,
        rule="send-test",
        event=event,
        title="mj-bridge test notification",
        body=f"If you can read this, mj-bridge can reach the target {target!r}.",
        group=None,
        attempts=0,
        created_at=now,
        next_at=now,
        last_error=None,
    )


async def send_test(name: str, config: TargetConfig, session: aiohttp.ClientSession) -> str:
    """Send one test notification to the target `name`. Returns what happened, for a human;
    raises DeliveryError (message redacted) when the target did not accept it."""
    try:
        target = build_target(name, config, session)
    except ValueError as exc:  # e.g. a whsec_ secret that is not base64
        raise DeliveryError(f"{name}: {redact(str(exc))}", retryable=False) from exc
    item = sample_item(name)
    started = time.monotonic()
    await target.send(item)
    elapsed = time.monotonic() - started
    return f"{name}: accepted the test notification in {elapsed * 1000:.0f} ms (id {item.event.id})"

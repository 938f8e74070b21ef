"""`bridge send-test TARGET`: one `bridge.test` event sent to one target through the same target
code the deliverer uses, the outcome in words. The argument parsing lives in cli.py.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

import aiohttp

from bridge.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bridge.config import Config, TargetConfig
from bridge.errors import DeliveryError, Redactor, redact
from bridge.models import Event, event_id
from bridge.store import OutboxItem
from bridge.targets import build_target, close_targets


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
    try:
        await target.send(item)
    finally:
        await close_targets([target])
    elapsed = time.monotonic() - started
    return f"{name}: accepted the test notification in {elapsed * 1000:.0f} ms (id {item.event.id})"


async def send_test_command(config: Config, target: str) -> int:
    """`bridge send-test TARGET`: the outcome on stdout (exit 0) or stderr (exit 1)."""
    if target not in config.targets:
        known = ", ".join(sorted(config.targets)) or "none"
        print(f"bridge: no target named {target!r} (configured: {known})", file=sys.stderr)
        return EXIT_USAGE
    redactor = Redactor(config.secrets())
    async with aiohttp.ClientSession() as session:
        try:
            print(redactor(await send_test(target, config.targets[target], session)))
        except DeliveryError as exc:
            verdict = (
                "the bridge would retry this"
                if exc.retryable
                else "the bridge would not retry this; check the target's settings"
            )
            print(f"{redactor(str(exc))}\n({verdict})", file=sys.stderr)
            return EXIT_FAILURE
    return EXIT_OK

"""`bridge demo`: the zero-config tour. The simulator stands in for the upstream, a local receiver
for the user's pipeline; the bridge in between is the real one (`Bridge`, a SQLite file in a
temporary folder), so what it prints is what `bridge run` does."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bridge.app import Bridge
from bridge.config import Config
from bridge.models import TERMINAL, Event
from bridge.receive import Key, Sink
from bridge.simulator import Simulator
from bridge.targets.webhook import signing_key

# (prompt, outcome, steps): one of each ending a user meets.
SCRIPT = [
    ("a lighthouse at dusk, oil painting --ar 3:2", "success", 4),
    ("cat --ar 1:1:1", "failure", 1),
    ("isometric tiny city, morning fog --v 7", "success", 3),
]
GREEN, RED, DIM, BOLD, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[1m", "\033[0m"


def _paint(text: str, colour: str) -> str:
    return f"{colour}{text}{RESET}" if sys.stdout.isatty() else text


def _describe(event: Event) -> str:
    task = event.task or {}
    prompt = str(task.get("prompt") or "")
    prompt = prompt if len(prompt) <= 36 else prompt[:35] + "…"
    detail = {
        "task.progress": f"{task.get('progress')}",
        "task.failed": f"{task.get('failReason')}",
        "task.succeeded": f"{str(task.get('imageUrl') or '')[:60]}",
    }.get(event.type, str(task.get("status") or event.data.get("reason") or ""))
    colour = {"task.succeeded": GREEN, "task.failed": RED}.get(event.type, BOLD)
    return f"{_paint('● ' + event.type, colour):<28} {event.subject}  {prompt!r}  {detail}"


async def demo(seconds: float = 60.0, show: Callable[[str], None] = print) -> int:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    receiver = Sink([Key("pipeline", "/pipeline", signing_key(secret))], {"/chat": "chat"}, show)
    sim = Simulator("midjourney-proxy", api_key="demo-key", seed=7)
    with tempfile.TemporaryDirectory(prefix="mj-bridge-demo-") as tmp:
        await sim.start()
        await receiver.start()
        # The demo prints each event and delivery; the service's INFO lines would repeat them.
        quiet = logging.getLogger("bridge")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            return await _play(sim, receiver, secret, Path(tmp) / "demo.db", seconds, show)
        finally:
            quiet.setLevel(level)
            await receiver.stop()
            await sim.stop()


async def _play(
    sim: Simulator,
    receiver: Sink,
    secret: str,
    db: Path,
    seconds: float,
    show: Callable[[str], None],
) -> int:
    config = Config.model_validate(
        {
            "sources": [
                {
                    "name": "demo",
                    "base_url": sim.url,
                    "api_key": "demo-key",
                    "auth": "mj-api-secret",
                    "poll_interval": "300ms",
                    "backfill": False,
                }
            ],
            "targets": {
                "pipeline": {"webhook": receiver.url + "/pipeline", "secret": secret},
                "chat": f"json://127.0.0.1:{receiver.url.rsplit(':', 1)[1]}/chat",
            },
            "rules": [
                {"name": "everything-to-pipeline", "on": "task.*", "to": "pipeline"},
                {"name": "endings-to-chat", "on": ["task.succeeded", "task.failed"], "to": "chat"},
            ],
        }
    )
    show(_paint("mj-bridge demo", BOLD))
    show(f"  upstream simulator (midjourney-proxy flavour) at {sim.url}")
    show(f"  webhook receiver at {receiver.url}/pipeline, chat (apprise json://) at /chat")
    sim.seed_tasks(5)
    show("  5 old tasks already exist upstream: recorded on first contact, no events (backfill)")
    bridge = Bridge(config, str(db))
    bridge.on_event.append(lambda event: show(_describe(event)))
    runner = asyncio.create_task(bridge.run())
    await bridge.wait_started()
    await asyncio.sleep(0.8)  # first contact happens before the scripted tasks arrive
    ids = [sim.add_task(p, outcome=o, steps=s) for p, o, s in SCRIPT]
    show(f"  submitted {len(ids)} tasks; the simulator moves them one step every 0.5 s\n")
    deadline = time.monotonic() + seconds
    finished = False
    while time.monotonic() < deadline and not runner.done():
        sim.tick()
        await asyncio.sleep(0.5)
        ends = {e["subject"] for e in receiver.events if e["type"] in _TERMINAL_EVENTS}
        if all((sim.task(i) or {}).get("status") in TERMINAL for i in ids) and ends >= set(ids):
            finished = True
            break
    await asyncio.sleep(0.5)  # let the chat notifications land
    bridge.stop()
    await runner
    seen = sorted({e["type"] for e in receiver.events})
    show(f"\n  {len(receiver.events)} events delivered, signed; types: {', '.join(seen)}")
    if not finished:
        show(_paint("  demo did not finish in time", RED))
        return 1
    show(_paint("  demo finished: every task change arrived once, signed", GREEN))
    return 0


_TERMINAL_EVENTS = {"task.succeeded", "task.failed", "task.cancelled"}

"""The upstream stand-in for the demo, the tests and the benches: a Midjourney task API
(`midjourney-proxy`/`plus`, `nz`, `trueai` or `new-api` flavour) on a real local HTTP server.
`serve()` is what `bridge simulate` runs.
"""

from __future__ import annotations

import asyncio
import random

from .app import Simulator
from .lifecycle import OUTCOMES
from .render import FLAVORS, NZ_LACKS
from .responses import FAULTS

__all__ = ["FAULTS", "FLAVORS", "OUTCOMES", "Simulator", "auth_header", "serve"]

_PROMPTS = (
    "a lighthouse in a storm, dramatic --ar 16:9",
    "cozy reading nook, warm light --v 6.1",
    "cyberpunk street market at night --niji 6",
    "watercolor hummingbird --style raw",
    "cat astronaut floating above earth",
    "ancient library carved in a cliff --ar 2:3",
)
# Mostly successes, a realistic share of everything else.
_MIX = ("success",) * 6 + ("failure", "banned", "timeout", "cancel", "modal")


def auth_header(flavor: str, api_key: str | None) -> str | None:
    """The header line a client must send to this flavour, e.g. "mj-api-secret: KEY"."""
    if api_key is None:
        return None
    match flavor:
        case "trueai":
            return f"Authorization: {api_key}"
        case "new-api":
            return f"Authorization: Bearer {api_key}"
    return f"mj-api-secret: {api_key}"


async def serve(port: int, flavor: str, tasks: int, api_key: str | None) -> None:
    """Run a simulator on 127.0.0.1:`port` until cancelled: `tasks` old finished tasks to start
    with, then a new task every two seconds with a mix of outcomes, ticking once a second.
    MODAL tasks are completed on the next round, as a client would (nz has no MODAL or CANCEL,
    so its mix leaves them out)."""
    sim = Simulator(flavor, api_key=api_key)
    mix = tuple(o for o in _MIX if sim.flavor != "nz" or o not in NZ_LACKS)
    sim.seed_tasks(tasks)
    rng = random.Random(0)
    await sim.start(port=port, tick_interval=1.0)
    try:
        header = auth_header(sim.flavor, api_key)
        print(f"simulator ({sim.flavor}) listening on {sim.url}", flush=True)
        path = "/mj/task/list"
        if sim.flavor == "new-api":
            # new-api lists no tasks (GET /mj/task/list answers its web page): fetch one by id.
            path = f"/mj/task/{sim.add_task(_PROMPTS[0], outcome='success', steps=3)}/fetch"
        if header:
            print(f"  auth header: {header}", flush=True)
            print(f"  try: curl -H '{header}' {sim.url}{path}", flush=True)
        else:
            print(f"  no auth; try: curl {sim.url}{path}", flush=True)
        if sim.flavor == "new-api":
            print("  new-api cannot list tasks: follow ids with `bridge track` (docs/sources.md)")
        waiting: list[str] = []
        while True:
            for task_id in waiting:
                sim.modal(task_id)
            waiting.clear()
            outcome = rng.choice(mix)
            task_id = sim.add_task(rng.choice(_PROMPTS), outcome=outcome, steps=rng.randint(2, 6))
            if outcome == "modal":
                waiting.append(task_id)
            await asyncio.sleep(2.0)
    finally:
        await sim.stop()

"""What the bridge does to and with the upstream beside reading it: `enrich: [seed]` adds each
succeeded task's seed to its event before the rules see it, and rules with `cancel: true` cancel
stalled tasks after the commit. Between diff and rules, and after the outbox, in watch/.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from bridge.config import SourceConfig
from bridge.errors import SourceError
from bridge.models import Event, EventType, iso
from bridge.rules import Router
from bridge.sources.poll import TaskAPI

log = logging.getLogger("bridge.actions")

SEED_LIMIT = 200  # seeds asked per change at most (a backfill of 100k successes asks none beyond)
SEED_CONCURRENCY = 8
# A seed is asked inside the watcher's lock, before the commit: a slow seed API must not hold the
# event (nor the source's next polls) for a whole source timeout.
SEED_TIMEOUT = 2.0


class UpstreamActions:
    """One per source. Holds the cancels whose outcome rides on the task's next event."""

    def __init__(self, config: SourceConfig, source: TaskAPI, clock: Callable[[], float]) -> None:
        self.config = config
        self.source = source
        self.clock = clock
        self._cancels: dict[
            str, dict[str, Any]
        ] = {}  # task id -> the cancel its next event carries

    async def finish(self, events: list[Event]) -> None:
        """Last touches on the events of one change: the bridge's own push token never leaves in
        a task's notifyHook, and a cancel the bridge asked for rides on the task's next event."""
        token = self.config.push_token
        for event in events:
            task = event.task
            if token and task is not None:
                props = task.get("properties")
                if isinstance(props, dict):
                    hook = props.get("notifyHook")
                    if isinstance(hook, str) and token in hook:
                        task["properties"] = {**props, "notifyHook": hook.replace(token, "***")}
            if self._cancels and event.type != EventType.STALLED:
                cancel = self._cancels.pop(event.subject, None)
                if cancel is not None:
                    event.data["cancel"] = cancel
        if "seed" in self.config.enrich:
            await self._seeds(events)

    async def _seeds(self, events: list[Event]) -> None:
        """enrich: [seed]: the seed of each newly succeeded task, asked once, all at once, each
        within SEED_TIMEOUT (or the source's timeout when shorter). A failure or no answer in
        time is logged and the event goes without the seed."""
        wanted = [
            e
            for e in events
            if e.type == EventType.SUCCEEDED and e.task is not None and not e.task.get("seed")
        ]
        if not wanted:
            return
        if len(wanted) > SEED_LIMIT:
            log.info(
                "%s: %d tasks succeeded at once (a backfill?): seeds asked for the newest %d only",
                self.config.name,
                len(wanted),
                SEED_LIMIT,
            )
            wanted = wanted[-SEED_LIMIT:]
        gate = asyncio.Semaphore(SEED_CONCURRENCY)
        timeout = min(self.config.timeout, SEED_TIMEOUT)
        hung: list[str] = []  # tasks of this change whose seed got no answer in time
        skipped: list[str] = []  # and those not asked after that

        async def one(event: Event) -> None:
            assert event.task is not None
            async with gate:
                if hung:  # the seed API hangs: the rest of this change goes without seeds
                    skipped.append(event.subject)
                    return
                try:
                    async with asyncio.timeout(timeout):
                        seed = await self.source.image_seed(event.subject)
                except TimeoutError:
                    hung.append(event.subject)
                    log.warning(
                        "%s: no seed for task %s: no answer within %gs",
                        self.config.name,
                        event.subject,
                        timeout,
                    )
                    return
                except SourceError as exc:
                    if exc.reason == "timeout":
                        hung.append(event.subject)
                    log.warning(
                        "%s: no seed for task %s (%s): %s",
                        self.config.name,
                        event.subject,
                        exc.reason,
                        exc,
                    )
                    return
            if seed is None:
                log.info(
                    "%s: the upstream has no seed for task %s", self.config.name, event.subject
                )
            else:
                event.task["seed"] = seed

        await asyncio.gather(*(one(e) for e in wanted))
        if skipped:
            log.warning(
                "%s: the seed API did not answer within %gs: %d more task(s) of this change go "
                "without a seed",
                self.config.name,
                timeout,
                len(skipped),
            )

    async def act(self, events: Sequence[Event], router: Router) -> None:
        """Rules with `cancel: true` on task.stalled: POST /mj/task/{id}/cancel once per stall;
        what happened rides on the task's next event as data.cancel."""
        for event in events:
            if event.type != EventType.STALLED:
                continue
            rules = router.cancels(event)
            if not rules:
                continue
            requested = self.clock()
            try:
                ok, answer = await self.source.cancel(event.subject)
            except SourceError as exc:
                ok, answer = False, f"{exc.reason}: {exc}"
            log.log(
                logging.INFO if ok else logging.WARNING,
                "%s: cancel of stalled task %s (rule %s): %s",
                self.config.name,
                event.subject,
                ", ".join(rules),
                "accepted" if ok else f"refused: {answer}",
            )
            self._cancels[event.subject] = {
                "requested_at": iso(datetime.fromtimestamp(requested, UTC)),
                "rule": rules[0],
                "ok": ok,
                "answer": answer,
            }

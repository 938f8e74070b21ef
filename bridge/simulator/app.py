"""The upstream stand-in: a real aiohttp server that serves the `/mj/task/*` and `/mj/submit/*`
APIs the way midjourney-proxy/plus, the open-source nz 2.x, trueai or new-api do, with tasks
driven by `tick()`, notifyHook callbacks, and injectable faults. Used by the demo, tests, benches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from bridge.errors import redact

from .lifecycle import CHANNEL, FAIL_CANCELLED_TA, Lifecycle, SimTask
from .render import NZ_LACKS, canonical_flavor, render, task_bytes
from .routes import Api

log = logging.getLogger(__name__)


class Simulator:
    """One simulated upstream. `add_task`/`tick` drive tasks deterministically (one lifecycle
    step per tick); `fault` makes every /mj/task/* endpoint misbehave; `requests` and
    `bytes_sent` measure what clients cost it."""

    def __init__(
        self,
        flavor: str = "midjourney-proxy",
        *,
        api_key: str | None = "sim-key",
        list_cap: int | None = None,
        seed: int = 0,
        notify_hook: str | None = None,
    ) -> None:
        self.flavor = canonical_flavor(flavor)
        self.api_key = api_key
        # None = the flavour's own cap: trueai takes the newest 100, the others none.
        self.list_cap = (
            list_cap if list_cap is not None else (100 if self.flavor == "trueai" else None)
        )
        self.notify_hook = notify_hook
        self.fault: str | None = None
        self.hang_seconds = 30.0
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self.notifications: list[tuple[str, str, int]] = []  # (task id, status, HTTP status|-1)
        self.url = ""
        self._life = Lifecycle(seed)
        self._tasks: dict[str, SimTask] = {}
        self._unfinished: dict[str, SimTask] = {}
        self._order: list[SimTask] | None = None  # submitTime desc, built lazily
        self._tick_interval: float | None = None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, str, str]] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.app = self._build_app()

    # lifecycle of the server -------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tick_interval: float | None = None
    ) -> str:
        """Serve on host:port (0 picks a free port); auto-tick every `tick_interval` seconds."""
        self._tick_interval = tick_interval
        self._closing.clear()
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except BaseException:  # the port is taken: close what setup opened, then say so
            await self._runner.cleanup()
            self._runner = None
            raise
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        self._life.cdn = f"{self.url}/attachments/{CHANNEL}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()  # wakes handlers hanging in the "timeout" fault
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _on_startup(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._outbox = asyncio.Queue()
        self._workers = [asyncio.create_task(self._post_notifications())]
        if self._tick_interval:
            self._workers.append(asyncio.create_task(self._auto_tick(self._tick_interval)))

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    async def _on_cleanup(self, app: web.Application) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        self._outbox = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _auto_tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.tick()

    # driving tasks -----------------------------------------------------------------------------

    def add_task(
        self,
        prompt: str = "a cat",
        *,
        action: str = "IMAGINE",
        outcome: str = "success",
        steps: int = 4,
        notify_hook: str | None = None,
        task_id: str | None = None,
        state: str | None = None,
        fail_reason: str | None = None,
    ) -> str:
        """Create a NOT_START task (MODAL for outcome "modal") and return its id.

        Ticks to the end: success = SUBMITTED, `steps` IN_PROGRESS updates, SUCCESS;
        failure = SUBMITTED, half the updates, FAILURE (`fail_reason`, default an invalid
        aspect ratio); banned = SUBMITTED, FAILURE; cancel = SUBMITTED, one update, CANCEL
        (trueai: FAILURE "取消任务"); timeout = SUBMITTED, one update, `steps` silent ticks,
        FAILURE "任务超时"; modal waits in MODAL until /mj/submit/modal or `modal()`.
        The nz flavour refuses "modal" and "cancel" (ValueError): it has neither status."""
        if task_id is not None and task_id in self._tasks:
            raise ValueError(f"task {task_id} exists")
        if self.flavor == "nz" and outcome in NZ_LACKS:
            raise ValueError(f"the nz flavour has no {outcome.upper()} status")
        task = self._life.new_task(
            prompt,
            action=action,
            outcome=outcome,
            steps=steps,
            notify_hook=notify_hook,
            state=state,
            task_id=task_id,
            fail_reason=fail_reason,
        )
        self._insert(task)
        return task.id

    def tick(self, n: int = 1) -> None:
        """Advance every unfinished task one lifecycle step, n times."""
        for _ in range(n):
            for task in list(self._unfinished.values()):
                if self._life.advance(task):
                    self._changed(task)

    def seed_tasks(self, n: int, *, finished: bool = True) -> None:
        """Bulk-create n tasks older than every existing one, a second apart: finished ones are
        ~90% SUCCESS and ~10% FAILURE; unfinished ones run to the end as ticks come."""
        prompts = (
            "a red fox in the snow --ar 16:9",
            "portrait of an astronaut, oil painting --v 6.1",
            "isometric city at night, neon --niji 6",
            "a bowl of ramen, studio lighting",
            "mountain lake at dawn --ar 3:2 --style raw",
        )
        first = self._life.older_ms(n, 1000)
        outcomes: tuple[str, ...] = ("success", "success", "success", "failure", "timeout")
        if self.flavor != "nz":
            outcomes += ("cancel",)
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            ms = first + i * 1000
            if finished:
                task = self._life.finished_task(prompt, ms)
            else:
                outcome = outcomes[self._life.rng.randrange(len(outcomes))]
                task = self._life.new_task(prompt, outcome=outcome, submit_ms=ms)
            self._tasks[task.id] = task
            if not task.finished:
                self._unfinished[task.id] = task
        self._order = None

    def task(self, task_id: str) -> dict[str, Any] | None:
        """The task's JSON as this flavour serves it from fetch, or None."""
        found = self._tasks.get(task_id)
        if found is None:
            return None
        return render(found, self.flavor, hook=self._hook(found), base_url=self.url)

    def remove_task(self, task_id: str) -> None:
        """Forget a task, as a store that expired it would."""
        task = self._tasks.pop(task_id, None)
        self._unfinished.pop(task_id, None)
        if task is not None and self._order is not None:
            self._order.remove(task)

    def cancel(self, task_id: str) -> bool:
        """Cancel an unfinished task as the flavour's cancel does: CANCEL, or on trueai FAILURE
        "取消任务" (nz cannot cancel). Returns whether it was cancelled."""
        task = self._tasks.get(task_id)
        if task is None or task.finished or self.flavor == "nz":
            return False
        if self.flavor == "trueai":
            self._life.fail(task, FAIL_CANCELLED_TA)
        else:
            self._life.cancel(task)
        self._changed(task)
        return True

    def modal(self, task_id: str, prompt: str | None = None) -> bool:
        """Complete a MODAL task as /mj/submit/modal does; it then runs to SUCCESS."""
        task = self._tasks.get(task_id)
        if task is None or task.status != "MODAL":
            return False
        self._life.submit_modal(task, prompt)
        return True

    async def flush(self) -> None:
        """Wait until every queued notifyHook callback has been posted (wrap it in a timeout)."""
        if self._outbox is not None:
            await self._outbox.join()

    def _insert(self, task: SimTask) -> None:
        self._tasks[task.id] = task
        if not task.finished:
            self._unfinished[task.id] = task
        if self._order is not None:
            head = self._order[0] if self._order else None
            if head is None or (task.submit_time, task.id) >= (head.submit_time, head.id):
                self._order.insert(0, task)
            else:
                self._order = None

    def _changed(self, task: SimTask) -> None:
        if task.finished:
            self._unfinished.pop(task.id, None)
        self._notify(task)

    def _hook(self, task: SimTask) -> str | None:
        return task.notify_hook or self.notify_hook

    def _bytes(self, task: SimTask) -> bytes:
        return task_bytes(task, self.flavor, hook=self._hook(task), base_url=self.url)

    def _pieces(self, tasks: Iterable[SimTask]) -> list[bytes]:
        # The cache lookup is inlined: this runs 100k times per list on the benches.
        flavor = self.flavor
        return [t.cache.get(flavor) or self._bytes(t) for t in tasks]

    def _join(self, tasks: Iterable[SimTask]) -> bytes:
        return b"[" + b",".join(self._pieces(tasks)) + b"]"

    def _ordered(self) -> list[SimTask]:
        if self._order is None:
            self._order = sorted(
                self._tasks.values(), key=lambda t: (t.submit_time, t.id), reverse=True
            )
        return self._order

    # notifyHook callbacks ----------------------------------------------------------------------

    def _notify(self, task: SimTask) -> None:
        """midjourney-proxy posts the full task after SUBMITTED and on every change; new-api
        strips notifyHook, so its clients get nothing."""
        hook = self._hook(task)
        if self.flavor == "new-api" or not hook or self._outbox is None:
            return
        self._outbox.put_nowait((hook, self._bytes(task), task.id, task.status))

    async def _post_notifications(self) -> None:
        # One worker keeps callbacks in order; no retries, failures are only logged (as upstream).
        assert self._outbox is not None
        assert self._session is not None
        while True:
            hook, body, task_id, status = await self._outbox.get()
            code = -1
            try:
                headers = {"Content-Type": "application/json"}
                async with self._session.post(hook, data=body, headers=headers) as resp:
                    await resp.read()
                    code = resp.status
                if code >= 300:
                    log.warning(
                        "notifyHook %s answered %s for task %s", redact(hook), code, task_id
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    "notifyHook %s failed for task %s: %s",
                    redact(hook),
                    task_id,
                    type(exc).__name__,
                )
            finally:
                self.notifications.append((task_id, status, code))
                self._outbox.task_done()

    def _build_app(self) -> web.Application:
        app = Api(self).build()
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

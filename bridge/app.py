"""The one place that opens and closes resources: the HTTP session, the store, the targets, the
watchers, the deliverer and the HTTP server, under one AsyncExitStack, with the loops in one
TaskGroup. Reload swaps the whole running configuration after validating the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bridge.config import Config, ConfigWatcher
from bridge.config.listen import is_loopback
from bridge.deliver import Deliverer
from bridge.deliver.lanes import TargetHealth
from bridge.errors import BridgeError, ConfigError, StoreError
from bridge.lease import lease_ttl, source_lease, while_leader
from bridge.logs import redact_with
from bridge.metrics import Metrics
from bridge.models import Event
from bridge.publish import Publisher
from bridge.retention import prune_forever
from bridge.rules import Router
from bridge.server import serve
from bridge.sources.poll import TaskAPI
from bridge.store import Store
from bridge.targets import build_target, close_targets
from bridge.watch import Watcher

log = logging.getLogger("bridge.app")

# Shutdown: in-flight deliveries get this long, the HTTP server 2 s more (server.py): within the
# 10 s a process manager (docker stop) gives before it kills.
DRAIN_SECONDS = 7.5


class _ListenFailed(Exception):
    """The server could not listen: fatal at start, a refused reload later."""


@dataclass(slots=True)
class Running:
    """What one configuration runs; the server reads it for health, metrics and the status page."""

    config: Config
    store: Store
    publisher: Publisher
    watchers: dict[str, Watcher]
    deliverer: Deliverer
    session: aiohttp.ClientSession

    @property
    def sources(self) -> Mapping[str, Watcher]:
        return self.watchers

    @property
    def targets(self) -> Mapping[str, TargetHealth]:
        return self.deliverer.health

    def wake(self) -> None:
        self.deliverer.wake()


@dataclass
class Bridge:
    """`bridge run`: poll, diff, route, deliver, serve. Stops on `stop()`; `swap()` reloads."""

    config: Config
    db: str
    on_event: list[Callable[[Event], None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    running: Running | None = None
    url: str | None = None  # the server's public URL while it listens
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _reload: asyncio.Event = field(default_factory=asyncio.Event)
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    _router: Router | None = None
    _broken: StoreError | None = None  # the store stayed broken: bridge run exits 1

    @property
    def live(self) -> Running | None:
        """What runs now, for the HTTP edge (None between two configurations)."""
        return self.running

    def stop(self) -> None:
        self._stop.set()

    def swap(self, config: Config) -> None:
        """Swap in a validated config whole: the running one is stopped cleanly and restarted."""
        self.config = config
        redact_with(config.secrets())
        log.info("config reloaded; restarting with it")
        self._reload.set()

    async def wait_started(self) -> Running:
        await self._started.wait()
        assert self.running is not None
        return self.running

    async def run(self) -> None:
        redact_with(self.config.secrets())
        async with AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            store = await Store.open(self.db)
            stack.push_async_callback(store.close)
            store.retrier.on_retry = self.metrics.store_retry
            good: Config | None = None  # the last config that started
            while not self._stop.is_set():
                self._reload.clear()
                config = self.config
                try:
                    await self._run_config(config, store, session)
                except _ListenFailed as exc:
                    if good is None:
                        raise BridgeError(str(exc)) from exc
                    log.error("reload refused: %s; the previous config keeps running", exc)
                    self.config = good
                    redact_with(good.secrets())
                    continue
                good = config
        if self._broken is not None:
            raise StoreError(
                f"{self._broken} (still failing after retrying for a while; stopped)"
            ) from self._broken

    async def _run_config(
        self, config: Config, store: Store, session: aiohttp.ClientSession
    ) -> None:
        private = frozenset(s.name for s in config.sources if s.allow_private_images)
        targets = {
            name: build_target(name, cfg, session, store, private_images=private)
            for name, cfg in config.targets.items()
        }
        abandoned = await store.abandon(config.targets)
        for name, count in sorted(abandoned.items()):
            log.warning(
                "%d deliveries to %r, which is no longer in the config, became dead letters "
                "(bridge dlq list; replay them once the target is back)",
                count,
                name,
            )
        deliverer = Deliverer(
            store,
            targets,
            config.targets,
            on_outcome=self.metrics.delivery,
            on_sent=self.metrics.sent,
        )
        # Throttle and digest memory carries over a reload for the rules that keep their name.
        self._router = Router(config, previous=self._router)
        publisher = Publisher(
            store, self._router, deliverer.wake, [self.metrics.event, *self.on_event]
        )
        watchers = {
            s.name: Watcher(s, TaskAPI(s, session), publisher, metrics=self.metrics)
            for s in config.sources
        }
        self.running = Running(config, store, publisher, watchers, deliverer, session)
        log.info(
            "running: sources %s; targets %s; rules %s; listen %s",
            ", ".join(f"{s.name} ({s.base_url})" for s in config.sources) or "none",
            ", ".join(config.targets) or "none",
            ", ".join(r.name for r in config.rules) or "none",
            config.server.listen if config.server else "off",
        )
        async with AsyncExitStack() as stack:
            # Last out: a broker target's connection closes after the deliverer has drained.
            stack.push_async_callback(close_targets, list(targets.values()))
            if config.server is not None:
                try:
                    self.url = await stack.enter_async_context(serve(self, config.server))
                    stack.callback(setattr, self, "url", None)
                except OSError as exc:  # the port is taken, the host does not resolve
                    reason = exc.strerror or str(exc)
                    raise _ListenFailed(
                        f"cannot listen on {config.server.listen}: {reason}"
                    ) from exc
                if not is_loopback(config.server.listen.host):
                    for s in config.sources:
                        if s.push_token is not None and len(s.push_token) < 16:
                            log.warning(
                                "%s: push_token has %d characters and the server listens on %s: "
                                "whoever guesses it can push and /track; use 16 or more random "
                                "characters (${MJ_PUSH_TOKEN})",
                                s.name,
                                len(s.push_token),
                                config.server.listen,
                            )
            async with asyncio.TaskGroup() as group:
                polls = [
                    group.create_task(self._fatal(self._lead(w, store))) for w in watchers.values()
                ]
                delivering = group.create_task(self._fatal(deliverer.run()))
                # Old sent deliveries and their events; cancelled with the polls.
                polls.append(group.create_task(prune_forever(store, config.retention)))
                self._started.set()
                stop = asyncio.ensure_future(self._stop.wait())
                reload = asyncio.ensure_future(self._reload.wait())
                try:
                    await asyncio.wait([stop, reload], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    reload.cancel()
                for task in polls:
                    task.cancel()
                await asyncio.gather(*polls, return_exceptions=True)
                await deliverer.drain(DRAIN_SECONDS)
                delivering.cancel()
        self._started.clear()

    async def _fatal(self, loop: Coroutine[Any, Any, None]) -> None:
        """Run a loop; a StoreError out of it (the store stayed broken through its retries)
        stops the bridge the clean way: polls stop, deliveries drain, exit 1 with one line."""
        try:
            await loop
        except StoreError as exc:
            if self._broken is None:
                log.error("%s; stopping", exc)
                self._broken = exc
            self._stop.set()

    async def _lead(self, watcher: Watcher, store: Store) -> None:
        """Poll the watcher's source while this process holds its lease (at once with SQLite: one
        process). Each leadership starts from the shared store's states (`Watcher.run`)."""

        async def poll() -> None:
            watcher.leading = True
            try:
                await watcher.run()
            finally:
                watcher.leading = False

        name = watcher.config.name
        ttl = lease_ttl(watcher.config.poll_interval)
        await while_leader(store, source_lease(name), store.holder, ttl, poll)


async def run_service(config: Config, db: str, config_path: Path) -> None:
    """`bridge run` with signals: SIGINT/SIGTERM stop cleanly, SIGHUP (or an edit of the file)
    reloads after validating; an invalid file is refused and the running config stays."""
    bridge = Bridge(config, db)

    def refused(exc: ConfigError) -> None:
        log.error("reload refused, the running config stays:\n%s", exc)

    watcher = ConfigWatcher(config_path, bridge.swap, refused)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, bridge.stop)
    loop.add_signal_handler(signal.SIGTERM, bridge.stop)
    loop.add_signal_handler(signal.SIGHUP, watcher.request_reload)
    watching = asyncio.create_task(watcher.run())
    try:
        await bridge.run()
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    log.info("stopped cleanly")

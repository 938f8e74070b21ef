"""Live reload: a new rules.yaml is validated whole before it replaces the running one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from bridge.config.document import MAX_BYTES
from bridge.config.load import load_config
from bridge.config.schema import Config
from bridge.errors import ConfigError, Problem

log = logging.getLogger("bridge.config")


class ConfigWatcher:
    """Reloads rules.yaml when its content changes (polled) or when asked (`check_now(force=True)`
    on SIGHUP). A new config is validated whole before `on_change` sees it; an invalid one goes to
    `on_error` once per distinct content and the old config keeps running. No file stops the
    watching: whatever goes wrong with one version is reported and the next edit is read."""

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[Config], None],
        on_error: Callable[[ConfigError], None],
        *,
        interval: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._on_change = on_change
        self._on_error = on_error
        self._env = env
        self._digest = self._read_digest()  # the content the running config came from
        self._wake = asyncio.Event()

    def _read_digest(self) -> str | None:
        digest = hashlib.blake2b(digest_size=16)
        try:
            with self.path.open("rb") as f:
                # The loader refuses a file above MAX_BYTES: a larger one is read no further.
                digest.update(f.read(MAX_BYTES + 1))
                digest.update(str(os.fstat(f.fileno()).st_size).encode())
        except OSError:
            return None
        return digest.hexdigest()

    def _read(self, force: bool) -> Config | ConfigError | None:
        """The new config, or why it is refused, or None when the file did not change."""
        digest = self._read_digest()
        if digest == self._digest and not force:
            return None
        self._digest = digest
        try:
            return load_config(self.path, self._env)
        except ConfigError as exc:
            return exc
        except Exception as exc:  # a loader bug: this version is refused, the watching goes on
            log.exception("reading %s failed", self.path)
            why = f"cannot load it ({type(exc).__name__}); the running config stays"
            return ConfigError([Problem(str(self.path), 1, 1, why)])

    def _apply(self, outcome: Config | ConfigError | None) -> Config | None:
        if isinstance(outcome, ConfigError):
            self._on_error(outcome)
            return None
        if outcome is not None:
            self._on_change(outcome)
        return outcome

    def check_now(self, *, force: bool = False) -> Config | None:
        """Reload if the file changed (or always, with force). Returns the new config if one was
        swapped in."""
        return self._apply(self._read(force))

    def reload_now(self) -> Config | None:
        """For SIGHUP: validate and swap in the file as it is now, changed or not."""
        return self.check_now(force=True)

    def request_reload(self) -> None:
        """For SIGHUP: reload at once from `run()`, off the event loop, changed or not."""
        self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled. The file is read in a thread (a large one takes a moment to
        parse); the callbacks run on the loop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            force = self._wake.is_set()
            self._wake.clear()
            try:
                self._apply(await asyncio.to_thread(self._read, force))
            except Exception:
                log.exception("config reload failed; still watching %s", self.path)

"""Live reload: a new rules.yaml is validated whole before it replaces the running one."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

from bridge.config.load import load_config
from bridge.config.schema import Config
from bridge.errors import ConfigError


class ConfigWatcher:
    """Reloads rules.yaml when its content changes (polled) or when asked (`check_now(force=True)`
    on SIGHUP). A new config is validated whole before `on_change` sees it; an invalid one goes to
    `on_error` once per distinct content and the old config keeps running."""

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

    def _read_digest(self) -> str | None:
        try:
            return hashlib.blake2b(self.path.read_bytes(), digest_size=16).hexdigest()
        except OSError:
            return None

    def check_now(self, *, force: bool = False) -> Config | None:
        """Reload if the file changed (or always, with force). Returns the new config if one was
        swapped in."""
        digest = self._read_digest()
        if digest == self._digest and not force:
            return None
        self._digest = digest
        try:
            config = load_config(self.path, self._env)
        except ConfigError as exc:
            self._on_error(exc)
            return None
        self._on_change(config)
        return config

    def reload_now(self) -> Config | None:
        """For SIGHUP: validate and swap in the file as it is now, changed or not."""
        return self.check_now(force=True)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.check_now()


async def watch_config(
    path: str | Path,
    on_change: Callable[[Config], None],
    on_error: Callable[[ConfigError], None],
    interval: float = 1.0,
) -> None:
    await ConfigWatcher(path, on_change, on_error, interval=interval).run()

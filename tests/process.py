"""`bridge run` as a real process for tests: started with a config text, its log lines collected
as they come, the status server's URL read from its log, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Self


class BridgeProcess:
    """`async with BridgeProcess(tmp_path, config_text) as bridge:`; the config should listen on
    127.0.0.1:0 for `url` to be known (`await bridge.serving()`)."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.config = tmp_path / "rules.yaml"
        self.config.write_text(config)
        self.db = tmp_path / "bridge.db"
        self.lines: list[str] = []
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            "-c",
            str(self.config),
            "--db",
            str(self.db),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if not self.url and (m := re.search(r"listening on (http://\S+)", line)):
                self.url = m[1]
            self._changed.set()
        self._changed.set()

    async def wait_log(self, pattern: str, within: float = 30.0) -> str:
        """The first log line matching `pattern` (a regex), waiting for it."""
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"bridge exited {self.proc.returncode}:\n{self.log}")
                self._changed.clear()
                await self._changed.wait()

    async def serving(self) -> str:
        await self.wait_log(r"listening on http://")
        return self.url

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def peak_rss(self) -> int:
        """The most resident memory the process has had so far, in bytes (Linux: VmHWM)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        assert m is not None, status
        return int(m[1]) * 1024

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM, then the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), within)

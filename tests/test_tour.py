"""The README's tour, run as the README writes it: `bridge simulate`, `bridge receive` and
`bridge run` with the shipped rules.yaml, each a real process. Only the ports differ (free ones,
through the environment the rules file reads and the commands' own flags), so a test run never
collides with a tour someone is trying on the same machine."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def tour() -> dict[str, list[str]]:
    """The commands of the README's "Run it" block, by subcommand, comments removed."""
    text = README.read_text()
    block = text.split("### Run it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = {}
    for line in block.splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        if argv:
            commands[argv[1]] = argv
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Command:
    """One command as a process; its output lines (stdout and stderr) collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, pattern: str, within: float) -> str:
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"{self.argv[1]} exited:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()


def test_the_readme_tour_names_the_four_commands() -> None:
    commands = tour()
    assert list(commands) == ["check", "simulate", "receive", "run"]
    assert all(argv[0] == ".venv/bin/bridge" for argv in commands.values())


@pytest.mark.skipif(not (ROOT / ".venv/bin/bridge").exists(), reason="needs `make .venv`")
async def test_the_readme_tour_delivers_verified_events_and_the_page_shows_them_sent(
    tmp_path: Path,
) -> None:
    commands = tour()
    sim_port, rx_port, bridge_port = free_port(), free_port(), free_port()
    env = {
        "MJ_BASE_URL": f"http://127.0.0.1:{sim_port}",
        "PIPELINE_URL": f"http://127.0.0.1:{rx_port}/mj-events",
        "CHAT_URL": f"json://127.0.0.1:{rx_port}/chat",
        "MJ_LISTEN": f"127.0.0.1:{bridge_port}",
    }
    check = await asyncio.create_subprocess_exec(*commands["check"], cwd=ROOT, env={**os.environ})
    assert await check.wait() == 0
    run = [str(tmp_path / "bridge.db") if a == "bridge.db" else a for a in commands["run"]]
    async with (
        Command([*commands["simulate"], "--port", str(sim_port)], env) as sim,
        Command([*commands["receive"], "--listen", f"127.0.0.1:{rx_port}"], env) as rx,
    ):
        await sim.wait_for("listening on", 30)
        await rx.wait_for("webhooks verified with the secrets of: pipeline", 30)
        async with Command(run, env) as bridge:
            line = await rx.wait_for(r"✓ pipeline: task\.succeeded .*\(signature verified\)", 90)
            task_id = line.split()[-3]
            # The shipped rules gather chat messages for 30 s.
            await rx.wait_for(r"✉ team-chat: ", 90)
            assert not [ln for ln in rx.lines if "does not verify" in ln]
            async with aiohttp.ClientSession() as http:

                async def sent_rows() -> list[str]:
                    async with http.get(f"http://127.0.0.1:{bridge_port}/") as resp:
                        assert resp.status == 200
                        page = await resp.text()
                    rows = re.findall(r'<tr data-delivery="[^"]*">(.*?)</tr>', page, re.S)
                    return [r for r in rows if "d-sent" in r]

                async def task_sent() -> bool:
                    url = f"http://127.0.0.1:{bridge_port}/api/tasks/mj/{task_id}"
                    async with http.get(url) as resp:
                        assert resp.status == 200
                        view = await resp.json()
                    return any(
                        d["target"] == "pipeline" and d["state"] == "sent"
                        for d in view["deliveries"]
                    )

                # Acks are written in batches: look until the page shows deliveries to both
                # targets as sent (the simulator goes on making tasks, so the page's latest
                # rows need not be this task's), and this task's webhook is sent in its view.
                async with asyncio.timeout(60):
                    while True:
                        rows = await sent_rows()
                        both = all(any(t in r for r in rows) for t in ("pipeline", "team-chat"))
                        if both and await task_sent():
                            break
                        await asyncio.sleep(0.2)
            assert bridge.proc is not None
            assert bridge.proc.returncode is None

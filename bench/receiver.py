"""A webhook receiver in its own process for the delivery and latency figures, so the sender and
the receiver do not share an event loop or a core. `python -m bench.receiver [--record]` prints
its port, answers every POST with 200, and stops when its stdin closes (its parent went away).

GET /_count: POSTs received so far. GET /_log (with --record): one row per POST,
[arrival unix time, path, task id, status, progress] read from a CloudEvent or a bare task body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
LogRow = tuple[float, str, str, str, str]


def _row(at: float, path: str, body: bytes) -> LogRow:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return (at, path, "", "", "")
    if isinstance(data, dict) and "specversion" in data:  # a CloudEvent from the bridge
        data = (data.get("data") or {}).get("task") or {}
    if not isinstance(data, dict):
        return (at, path, "", "", "")
    return (at, path, str(data.get("id", "")), str(data.get("status")), str(data.get("progress")))


def build_app(record: bool) -> web.Application:
    count = 0
    log: list[LogRow] = []

    async def receive(request: web.Request) -> web.Response:
        nonlocal count
        body = await request.read()
        count += 1
        if record:
            log.append(_row(time.time(), request.path, body))
        return web.Response()

    async def counted(request: web.Request) -> web.Response:
        return web.json_response({"count": count})

    async def logged(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(log), content_type="application/json")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/_count", counted)
    app.router.add_get("/_log", logged)
    app.router.add_post("/{tail:.*}", receive)
    return app


async def main(record: bool) -> None:
    runner = web.AppRunner(build_app(record), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    loop = asyncio.get_running_loop()
    try:
        # Until the parent closes our stdin (or dies): no orphan left behind either way.
        await loop.run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await runner.cleanup()


class ReceiverProcess:
    """Starts `python -m bench.receiver` and stops it on exit.

    async with ReceiverProcess(record=True) as rx:
        ... post to rx.url ...
        rows = await rx.log()
    """

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        args = [sys.executable, "-m", "bench.receiver", *(["--record"] if self.record else [])]
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self._proc.stdout.readline()
        if not line.strip().isdigit():
            await self._stop()
            raise RuntimeError(f"bench receiver did not start: {line!r}")
        self.port = int(line)
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _get(self, path: str) -> Any:
        assert self._session is not None
        async with self._session.get(self.url + path) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def count(self) -> int:
        return int((await self._get("/_count"))["count"])

    async def log(self) -> list[LogRow]:
        return [tuple(row) for row in await self._get("/_log")]

    async def wait_for(self, count: int, within: float = 60.0, every: float = 0.01) -> None:
        """Until at least `count` POSTs arrived (TimeoutError after `within` seconds)."""
        async with asyncio.timeout(within):
            # Another process: there is nothing to await but its answers.
            while await self.count() < count:  # noqa: ASYNC110
                await asyncio.sleep(every)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--record", action="store_true", help="keep a log row per POST")
    asyncio.run(main(parser.parse_args().record))

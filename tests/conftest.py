"""Fixtures most test files share: an HTTP client session, the local webhook receiver, the local
chat API stand-in and a store on each backend, each closed when the test ends; and `bridge()`,
the `bridge` command as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from bridge import logs
from bridge.store import Store, open_store
from tests import pg
from tests.chat_api import ChatAPI
from tests.receiver import Receiver


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.fixture
async def api() -> AsyncIterator[ChatAPI]:
    async with ChatAPI() as a:
        yield a


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """main() sets up logging for the process, as `bridge` does (its handler redacts records in
    place, and it sets the levels of the bridge's and the libraries' loggers): put it all back
    after, so later tests' caplog sees what the code logged and no handler writes to a stream
    that a finished test closed."""
    root = logging.getLogger()
    names = ["bridge", *logs.LIBRARIES]
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was in levels.items():
            logging.getLogger(name).setLevel(was)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every test: several call main() in-process, which configures logging for the process."""
    with kept_logging():
        yield


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every test taking `store` runs against both backends (PostgreSQL: a throwaway database)."""
    if request.param == "sqlite":
        async with await open_store(str(tmp_path / "bridge.db")) as s:
            yield s
        return
    async with pg.database() as url, await open_store(url) as s:
        yield s


ROOT = Path(__file__).resolve().parent.parent


async def bridge(*args: str, log: Path | None = None) -> asyncio.subprocess.Process:
    """`python -m bridge ARGS...` as a real process; its output goes to `log`, else to pipes."""
    out = log.open("wb") if log is not None else None
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out or asyncio.subprocess.PIPE,
            stderr=out or asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        if out is not None:
            out.close()

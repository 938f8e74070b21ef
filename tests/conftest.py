"""Fixtures most test files share: an HTTP client session, the local webhook receiver and the
local chat API stand-in, each closed when the test ends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from bridge import logs
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

"""Fixtures most test files share: an HTTP client session, the local webhook receiver and the
local chat API stand-in, each closed when the test ends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

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
    place): put it back after, so later tests' caplog sees what the code logged."""
    root, apprise_log = logging.getLogger(), logging.getLogger("apprise")
    handlers, level, apprise_level = root.handlers[:], root.level, apprise_log.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        apprise_log.setLevel(apprise_level)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    with kept_logging():
        yield

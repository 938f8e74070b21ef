"""Fixtures most test files share: an HTTP client session, the local webhook receiver and the
local chat API stand-in, each closed when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

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

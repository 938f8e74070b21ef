"""PostgreSQL for tests: the server in BRIDGE_TEST_PG (else the local default, if it answers) and a
throwaway database per test. Without a server the PostgreSQL tests are skipped, unless
BRIDGE_REQUIRE_PG=1 (CI), when they fail.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(server URL, why not) once per test run."""
    url = os.environ.get("BRIDGE_TEST_PG") or DEFAULT_URL
    where = "BRIDGE_TEST_PG" if os.environ.get("BRIDGE_TEST_PG") else "the local default"
    answer: list[BaseException | None] = []

    async def ping() -> None:
        conn = await asyncpg.connect(url, timeout=3)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    def run() -> None:  # a thread of its own: the tests' event loop is not disturbed
        try:
            asyncio.run(ping())
            answer.append(None)
        except BaseException as exc:
            answer.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    if answer and answer[0] is None:
        return url, ""
    error = answer[0] if answer else "no answer in 10s"
    return None, f"no PostgreSQL at {where} ({_safe(url)}): {error}"


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def server() -> str:
    """The server's URL, or skip (fail under BRIDGE_REQUIRE_PG=1) the calling test."""
    url, why = _probe()
    if url is None:
        if os.environ.get("BRIDGE_REQUIRE_PG") == "1":
            pytest.fail(f"BRIDGE_REQUIRE_PG=1 but {why}")
        pytest.skip(f"PostgreSQL tests need a server: set BRIDGE_TEST_PG=postgresql://... ({why})")
    return url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@asynccontextmanager
async def database(url: str | None = None) -> AsyncIterator[str]:
    """A fresh database `bridge_test_<random>` on the server; dropped afterwards. Yields its URL."""
    url = url or server()
    name = f"bridge_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(url, name)
    finally:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

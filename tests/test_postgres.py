"""The PostgreSQL store as replicas share it: claims are exclusive (SKIP LOCKED) and expire when
their replica dies, live claims are renewed, concurrent commits store a change once, concurrent
starts migrate once, and connection problems never show the password. (The behaviour both
backends share is in test_store.py.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from bridge.config import WebhookTargetConfig
from bridge.deliver import Deliverer
from bridge.errors import StoreError
from bridge.store import Store, open_store
from bridge.store.postgres import PostgresStore
from bridge.store.schema import POSTGRES_MIGRATIONS
from bridge.targets import build_target
from tests import pg
from tests.receiver import Receiver, make_delivery, make_event


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with pg.database() as db_url:
        yield db_url


async def commit_n(store: Store, n: int, target: str = "hook") -> list[str]:
    events = [make_event(i) for i in range(n)]
    deliveries = [make_delivery(e, target) for e in events]
    await store.commit("mj", {}, events, deliveries)
    return [d.id for d in deliveries]


async def test_the_url_picks_the_backend(url: str) -> None:
    async with await Store.open(url) as store:
        assert isinstance(store, PostgresStore)
    async with await open_store(url.replace("postgresql://", "postgres://", 1)) as store:
        assert isinstance(store, PostgresStore)


async def test_replicas_claiming_at_once_never_take_the_same_delivery(url: str) -> None:
    async with await open_store(url) as a, await open_store(url) as b, await open_store(url) as c:
        ids = await commit_n(a, 300)
        taken: dict[str, list[str]] = {}

        async def drain(store: Store, name: str) -> None:
            got = taken.setdefault(name, [])
            while items := await store.claim("hook", time.time() + 1, 7):
                got.extend(i.id for i in items)
                await asyncio.sleep(0)

        await asyncio.gather(drain(a, "a"), drain(b, "b"), drain(c, "c"))
        everything = [i for got in taken.values() for i in got]
        assert sorted(everything) == sorted(ids)  # each exactly once
        assert sum(1 for got in taken.values() if got) >= 2  # they really shared the work


async def test_a_dead_replicas_claims_come_back_after_the_visibility_timeout(url: str) -> None:
    async with await open_store(url) as survivor:
        ids = await commit_n(survivor, 5)
        dead = await open_store(url + "?claim_timeout=0.3")
        assert len(await dead.claim("hook", time.time(), 10)) == 5
        await dead.close()  # gone without releasing or acking: its claims stay in flight
        assert await survivor.claim("hook", time.time(), 10) == []
        due = await survivor.next_due("hook")
        assert due is not None
        assert due <= time.time() + 0.5  # the survivor knows when to look again
        await asyncio.sleep(max(0.0, due - time.time()) + 0.05)
        again = await survivor.claim("hook", time.time(), 10)
        assert sorted(i.id for i in again) == sorted(ids)
        assert all(i.attempts == 0 for i in again)
        await survivor.mark_sent([i.id for i in again])
        assert await survivor.outbox_depth() == {}


async def test_a_live_replica_keeps_its_claims_however_long_it_sends(url: str) -> None:
    async with (
        await open_store(url + "?claim_timeout=0.3") as slow,
        await open_store(url) as other,
    ):
        await commit_n(slow, 3)
        items = await slow.claim("hook", time.time(), 10)
        assert len(items) == 3
        keeper = asyncio.create_task(slow.keep_claims())  # as its Deliverer runs it
        await asyncio.sleep(0.8)  # well past the timeout: the claims were renewed meanwhile
        assert await other.claim("hook", time.time(), 10) == []
        keeper.cancel()
        await slow.mark_sent([i.id for i in items])
        assert await other.outbox_depth() == {}


async def test_release_hands_back_only_our_own_claims(url: str) -> None:
    async with await open_store(url) as a, await open_store(url) as b:
        await commit_n(a, 2)
        [mine, theirs] = await a.claim("hook", time.time(), 1) + await b.claim(
            "hook", time.time(), 1
        )
        await a.release([mine.id, theirs.id])
        assert [i.id for i in await b.claim("hook", time.time(), 10)] == [mine.id]


async def test_two_replicas_committing_one_change_store_it_once(url: str) -> None:
    async with await open_store(url) as a, await open_store(url) as b:
        events = [make_event(i) for i in range(50)]
        deliveries = [make_delivery(e, t) for e in events for t in ("hook", "chat")]
        results = await asyncio.gather(
            *(s.commit("mj", {}, events, deliveries) for s in (a, b, a, b))
        )
        assert sorted(e.id for new in results for e in new) == sorted(e.id for e in events)
        assert await a.outbox_depth() == {"hook": 50, "chat": 50}


async def test_concurrent_starts_migrate_once(url: str) -> None:
    stores = await asyncio.gather(*(open_store(url) for _ in range(5)))
    for store in stores:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetch("SELECT version FROM bridge_schema") == [
            (len(POSTGRES_MIGRATIONS),)
        ]
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused(url: str) -> None:
    async with await open_store(url):
        pass
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE bridge_schema SET version = 999")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer"):
        await open_store(url)


async def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        await open_store("postgresql://bridge:hunter2-secret@127.0.0.1:1/bridge?connect_for=0")
    assert "hunter2" not in str(caught.value)
    assert "127.0.0.1:1/bridge" in str(caught.value)


async def test_claim_timeout_must_be_seconds() -> None:
    with pytest.raises(StoreError, match="claim_timeout"):
        await open_store("postgresql://postgres@127.0.0.1/x?claim_timeout=soon")


async def test_two_deliverers_on_one_outbox_send_each_delivery_once(url: str) -> None:
    import aiohttp

    n = 400
    async with (
        Receiver() as rx,
        aiohttp.ClientSession() as session,
        await open_store(url) as a,
        await open_store(url) as b,
    ):
        config = WebhookTargetConfig(webhook=rx.url + "/hook", secret="s" * 24, concurrency=8)
        deliverers = [
            Deliverer(s, {"hook": build_target("hook", config, session)}, {"hook": config})
            for s in (a, b)
        ]
        runs = [asyncio.create_task(d.run()) for d in deliverers]
        events = [make_event(i) for i in range(n)]
        for start in range(0, n, 50):
            chunk = events[start : start + 50]
            await a.commit("mj", {}, chunk, [make_delivery(e, "hook") for e in chunk])
            for d in deliverers:
                d.wake()
        await rx.wait_for(n, within=30)
        for d in deliverers:
            await d.drain(5.0)
        await asyncio.gather(*runs)
        ids = [r.headers["webhook-id"] for r in rx.requests]
        assert sorted(ids) == sorted(e.id for e in events)
        assert all(d.counts[("hook", "sent")] > 0 for d in deliverers)
        assert await a.outbox_depth() == {}


async def test_a_database_that_comes_up_late_is_waited_for() -> None:
    """Replicas often start before their database: the first connection is tried again until
    the server answers (here a proxy to the real server that starts listening a moment late)."""
    async with pg.database() as url:
        real = urlsplit(url)
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            server_r, server_w = await asyncio.open_connection(real.hostname, real.port or 5432)
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

        async def late_proxy() -> asyncio.Server:
            await asyncio.sleep(0.8)
            return await asyncio.start_server(forward, "127.0.0.1", port)

        starting = asyncio.create_task(late_proxy())
        late = urlunsplit(real._replace(netloc=f"{real.username}@127.0.0.1:{port}"))
        try:
            async with await open_store(late + "?connect_for=20") as store:
                assert await store.dead_letters() == []
        finally:
            proxy = await starting
            proxy.close()
            await proxy.wait_closed()


@pytest.mark.usefixtures("restore_logging")
async def test_a_command_on_a_database_the_bridge_never_used_says_so(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    parts = urlsplit(url)
    with_password = urlunsplit(
        parts._replace(netloc=f"postgres:pw-secret-42@{parts.hostname}:{parts.port or 5432}")
    )
    assert await asyncio.to_thread(main, ["dlq", "list", "--db", with_password]) == 1
    said = capsys.readouterr().err
    assert "holds no bridge tables" in said
    assert "bridge run" in said
    assert "pw-secret-42" not in said
    assert "bridge_schema" not in said

"""The outbox store: a snapshot stored in parts with its states last, nothing stored twice,
claims, retries, dead letters and replay, migrations and crash recovery of in-flight deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import time
from pathlib import Path

import orjson
import pytest

from bridge.errors import StoreError
from bridge.models import TaskState, event_json
from bridge.store import Store
from bridge.store.rows import COMMIT_CHUNK, RecentPayloads
from bridge.store.schema import SQLITE_MIGRATIONS
from tests import pg
from tests.receiver import make_delivery, make_event


async def test_commit_stores_states_events_and_deliveries(store: Store) -> None:
    events = [make_event(1), make_event(2, "task.failed")]
    deliveries = [make_delivery(e, t) for e in events for t in ("hook", "chat")]
    states = {
        "1": TaskState("SUCCESS", 100, 10.0, finished=True),
        "2": TaskState("FAILURE", 0, 11.0),
    }

    new = await store.commit("mj", states, events, deliveries)

    assert [e.id for e in new] == [e.id for e in events]
    assert await store.load_tasks("mj") == states
    assert await store.load_tasks("other") == {}
    assert await store.source_seen("mj")
    assert not await store.source_seen("other")
    assert await store.outbox_depth() == {"hook": 2, "chat": 2}
    recent = await store.recent_events()
    assert {e.id for e in recent} == {e.id for e in events}
    assert recent[0].cloudevent()["data"]["task"]["id"] in {"1", "2"}


async def test_recommitting_the_same_change_stores_nothing_twice(store: Store) -> None:
    event = make_event(1)
    delivery = make_delivery(event, "hook")
    assert await store.commit("mj", {}, [event], [delivery]) == [event]
    # A crash after the commit and a re-detection yield the same ids: nothing new, nothing resent.
    items = await store.claim("hook", time.time() + 1, 10)
    await store.mark_sent([i.id for i in items])
    assert await store.commit("mj", {}, [event], [delivery]) == []
    assert await store.claim("hook", time.time() + 1, 10) == []
    assert await store.outbox_depth() == {}


async def test_a_large_snapshot_is_stored_in_parts_with_its_states_last(store: Store) -> None:
    """Sending starts with the first part; a crash between parts (here: the callback raising)
    leaves the states unwritten, so the snapshot is re-detected, and storing it again adds only
    what was missing, under the same ids."""
    n = COMMIT_CHUNK * 2 + 7
    events = [make_event(i) for i in range(n)]
    deliveries = [make_delivery(e, "hook") for e in events]
    states = {str(i): TaskState("SUCCESS", 100, 1.0, finished=True) for i in range(n)}

    class Crash(Exception):
        pass

    def crash() -> None:
        raise Crash

    with pytest.raises(Crash):  # the process dies right after the first part
        await store.commit("mj", states, events, deliveries, progress=crash)
    assert await store.outbox_depth() == {"hook": COMMIT_CHUNK}  # sendable already
    assert await store.load_tasks("mj") == {}  # so the snapshot is seen again
    assert not await store.source_seen("mj")

    calls: list[int] = []
    new = await store.commit("mj", states, events, deliveries, progress=lambda: calls.append(1))
    assert [e.id for e in new] == [e.id for e in events[COMMIT_CHUNK:]]  # in the order given
    assert len(calls) == 1  # after the second part; the third (last) carries the states
    assert await store.load_tasks("mj") == states
    assert await store.outbox_depth() == {"hook": n}
    assert await store.source_seen("mj")


async def test_each_part_of_a_large_snapshot_is_a_step_even_without_deliveries(
    store: Store,
) -> None:
    """A backfill that routes nothing still moves on part by part (what /readyz watches); only
    parts with deliveries wake the deliverer."""
    events = [make_event(i) for i in range(COMMIT_CHUNK * 2 + 7)]
    steps: list[int] = []
    wakes: list[int] = []
    new = await store.commit(
        "mj", {}, events, [], progress=lambda: wakes.append(1), step=lambda: steps.append(1)
    )
    assert len(new) == len(events)
    assert (len(steps), len(wakes)) == (2, 0)  # after the first two parts; the last holds states


async def test_silent_first_contact_records_state_and_seen(store: Store) -> None:
    await store.commit("mj", {"7": TaskState("IN_PROGRESS", 40, 1.0)}, [], [], seen=True)
    assert await store.source_seen("mj")
    await store.commit("other", {}, [], [], seen=False)
    assert not await store.source_seen("other")


async def test_claim_takes_due_items_once_and_in_order(store: Store) -> None:
    events = [make_event(i) for i in range(5)]
    await store.commit("mj", {}, events, [make_delivery(e, "hook") for e in events])
    now = time.time() + 1
    first = await store.claim("hook", now, 3)
    second = await store.claim("hook", now, 3)
    assert len(first) == 3
    assert len(second) == 2
    assert {i.id for i in first}.isdisjoint(i.id for i in second)
    assert await store.claim("hook", now, 3) == []
    assert await store.claim("chat", now, 3) == []
    item = first[0]
    assert item.event.id == events[0].id
    assert item.event.cloudevent() == events[0].cloudevent() | {
        "time": item.event.cloudevent()["time"]
    }
    assert (item.title, item.body, item.attempts, item.last_error) == (
        "task 0 done",
        "body of 0",
        0,
        None,
    )


async def test_not_before_delays_the_first_attempt(store: Store) -> None:
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    event = make_event(1)
    later = datetime.now(UTC) + timedelta(seconds=30)
    await store.commit("mj", {}, [event], [replace(make_delivery(event, "hook"), not_before=later)])
    assert await store.claim("hook", time.time(), 10) == []
    due = await store.next_due("hook")
    assert due == pytest.approx(later.timestamp(), abs=0.01)
    assert len(await store.claim("hook", later.timestamp() + 0.01, 10)) == 1


async def test_retry_dead_and_replay(store: Store) -> None:
    event = make_event(1)
    await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    [item] = await store.claim("hook", time.time(), 10)
    await store.mark_retry(item.id, time.time() + 60, "HTTP 503")
    assert await store.claim("hook", time.time(), 10) == []
    assert await store.next_due("hook") == pytest.approx(time.time() + 60, abs=2)
    [item] = await store.claim("hook", time.time() + 61, 10)
    assert (item.attempts, item.last_error) == (1, "HTTP 503")

    await store.mark_dead(item.id, "HTTP 400: bad")
    [dead] = await store.dead_letters()
    assert (dead.id, dead.attempts, dead.last_error) == (item.id, 2, "HTTP 400: bad")
    assert await store.outbox_depth() == {}
    assert await store.next_due("hook") is None

    assert await store.replay(["nope"]) == 0
    assert await store.replay([item.id]) == 1
    assert await store.dead_letters() == []
    [again] = await store.claim("hook", time.time() + 0.01, 10)
    assert again.attempts == 0  # replay starts the count (and the age) afresh


async def test_replay_all(store: Store) -> None:
    events = [make_event(i) for i in range(3)]
    await store.commit("mj", {}, events, [make_delivery(e, "hook") for e in events])
    for item in await store.claim("hook", time.time(), 10):
        await store.mark_dead(item.id, "boom")
    assert len(await store.dead_letters()) == 3
    assert await store.replay(None) == 3
    assert await store.outbox_depth() == {"hook": 3}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_opening_the_store_for_a_command_changes_nothing(
    backend: str, tmp_path: Path
) -> None:
    """`bridge dlq list`, `track` or a second `bridge run` open the store beside a live bridge:
    its claims stay in flight and its lease stays its own."""
    url = str(tmp_path / "b.db")
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            url = await stack.enter_async_context(pg.database())
        store = await stack.enter_async_context(await Store.open(url))
        await _beside_a_live_store(store, url)


async def _beside_a_live_store(store: Store, url: str) -> None:
    event = make_event(1)
    await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    assert len(await store.claim("hook", time.time(), 10)) == 1
    assert await store.try_lease("source:mj", store.holder, 60)
    async with await Store.open(url, readonly=True) as look:
        assert await look.outbox_depth() == {"hook": 1}
        assert await look.dead_letters() == []
    async with await Store.open(url) as other:
        assert await other.recover() == 0  # the live holder's claims are not anyone's to take
        assert await other.claim("hook", time.time() + 60, 10) == []
        assert not await other.try_lease("source:mj", other.holder, 60)
    lease = await store.lease("source:mj")
    assert lease is not None
    assert lease[0] == store.holder


async def test_a_read_only_open_writes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    async with await Store.open(path) as store:
        event = make_event(1)
        await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    async with await Store.open(path, readonly=True) as look:
        assert await look.outbox_depth() == {"hook": 1}
        with pytest.raises(StoreError, match="readonly"):
            await look.replay(None)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_claims_and_leases_of_a_gone_process_come_back_when_the_next_one_delivers(
    backend: str, tmp_path: Path
) -> None:
    url = str(tmp_path / "b.db")
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            url = await stack.enter_async_context(pg.database())
        dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await dead.wait()  # a pid on this host that no longer runs
        holder = f"{socket.gethostname()}:{dead.pid}:abcdef"
        async with await Store.open(url) as store:
            event = make_event(1)
            await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
            store.holder = holder  # as that process claimed it and took the lease
            assert len(await store.claim("hook", time.time(), 10)) == 1
            assert await store.try_lease("source:mj", holder, 600)
        async with await Store.open(url) as store:
            assert await store.claim("hook", time.time(), 10) == []  # opening recovers nothing
            assert await store.recover() == 1  # the deliverer's first step
            [item] = await store.claim("hook", time.time(), 10)
            assert item.attempts == 0
            assert await store.lease("source:mj") is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_claim_sends_what_was_stored_whether_just_committed_or_read_back(
    backend: str, tmp_path: Path
) -> None:
    """Right after a commit a claim takes the event's JSON from memory (RecentPayloads); a process
    that did not commit it (a restart, another replica) reads it from the database. Either way
    the target gets the very bytes that were stored."""
    events = [make_event(i, prompt="ünïcode ✓ " * i) for i in range(4)]
    deliveries = [make_delivery(e, t) for e in events for t in ("hook", "chat")]
    async with contextlib.AsyncExitStack() as stack:
        url = str(tmp_path / "b.db")
        if backend == "postgres":
            url = await stack.enter_async_context(pg.database())
        async with await Store.open(url) as store:
            await store.commit("mj", {}, events, deliveries)
            hot = await store.claim("hook", time.time() + 1, 10)
        async with await Store.open(url) as store:  # another process: nothing in memory
            cold = await store.claim("chat", time.time() + 1, 10)
    stored = {e.id: event_json(e) for e in events}
    assert len(hot) == 4
    assert len(cold) == 4
    for item in hot + cold:
        assert item.payload == stored[item.event_id]
        assert item.event.cloudevent() == orjson.loads(stored[item.event_id])


async def test_events_whose_id_hashes_collide_stay_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite finds an event by a 64-bit hash of its id and then compares the id: with every hash
    made equal, nothing is taken for stored that is not, and each delivery gets its own event."""
    monkeypatch.setattr("bridge.store.sqlite_snapshots.id_hash", lambda event_id: 7)
    monkeypatch.setattr("bridge.store.sqlite_outbox.id_hash", lambda event_id: 7)
    events = [make_event(n) for n in range(3)]
    path = str(tmp_path / "b.db")
    async with await Store.open(path) as store:
        assert await store.commit("mj", {}, events[:1], [make_delivery(events[0], "hook")]) == [
            events[0]
        ]
        new = await store.commit("mj", {}, events, [make_delivery(e, "hook") for e in events])
        assert new == events[1:]
    async with await Store.open(path) as store:  # cold: the JSON comes from the table
        items = await store.claim("hook", time.time() + 1, 10)
        assert sorted((i.event_id, i.payload) for i in items) == sorted(
            (e.id, event_json(e)) for e in events
        )
        await store.mark_retry(items[0].id, time.time() + 60, "later")
    async with await Store.open(path) as store:  # and a retry found its own row
        assert await store.recover() == 2  # the other two, claimed by the closed store
        assert len(await store.claim("hook", time.time() + 1, 10)) == 2
        assert await store.outbox_depth() == {"hook": 3}
        await store.mark_dead(items[0].id, "gone")  # not claimed here: found by event and target
        assert [d.id for d in await store.dead_letters()] == [items[0].id]


def test_recent_payloads_keep_the_newest_within_their_limit() -> None:
    recent = RecentPayloads(limit=10)
    recent.put("a", b"1234")
    recent.put("b", b"1234")
    recent.put("a", b"12")  # replaced: counts its new size
    recent.put("c", b"1234")  # 10 bytes: all fit
    assert [recent.get(k) for k in "abc"] == [b"12", b"1234", b"1234"]
    recent.put("d", b"123")  # over: the oldest (b) goes
    assert recent.get("b") is None
    assert len(recent) == 3
    recent.put("huge", b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert recent.get("huge") is None
    assert len(recent) == 3


async def test_release_hands_back_claimed_items(store: Store) -> None:
    event = make_event(1)
    await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    [item] = await store.claim("hook", time.time(), 10)
    await store.release([item.id])
    [again] = await store.claim("hook", time.time(), 10)
    assert again.id == item.id


async def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with await Store.open(str(path)):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA page_size").fetchone()[0] == 8192  # three events to a page
        db.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreError, match="newer"):
        await Store.open(str(path))


async def test_a_database_made_by_an_earlier_version_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # 4 KiB pages, SQLite's default, as earlier versions made
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE unrelated (x)")
    async with await Store.open(str(path)) as store:
        event = make_event(1)
        await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
        [item] = await store.claim("hook", time.time() + 1, 10)
        assert item.event_id == event.id
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096


async def test_a_failed_commit_leaves_nothing_behind(store: Store) -> None:
    from dataclasses import replace

    event = make_event(1)
    # The outbox insert comes last and fails on a value the database cannot bind: states and events
    # written before it in the same transaction must be gone too.
    broken = replace(make_delivery(event, "hook"), title=object())
    with pytest.raises(StoreError) as info:  # translated at the backend's boundary
        await store.commit("mj", {"1": TaskState("SUCCESS", 100, 1.0)}, [event], [broken])
    assert not info.value.transient
    assert await store.load_tasks("mj") == {}
    assert await store.recent_events() == []
    assert await store.outbox_depth() == {}
    assert not await store.source_seen("mj")


async def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await Store.open(str(tmp_path / "missing-dir" / "b.db"))


async def test_message_references_are_upserted_per_target_and_key(store: Store) -> None:
    assert await store.get_message("discord", "mj:1") is None
    await store.put_message("discord", "mj:1", "msg-1")
    await store.put_message("slack", "mj:1", "ts-1")
    assert await store.get_message("discord", "mj:1") == "msg-1"
    await store.put_message("discord", "mj:1", "msg-2")
    assert await store.get_message("discord", "mj:1") == "msg-2"
    assert await store.get_message("slack", "mj:1") == "ts-1"
    assert await store.get_message("slack", "mj:2") is None


async def test_leases_are_exclusive_until_released_or_expired(store: Store) -> None:
    assert await store.lease("source:mj") is None
    assert await store.try_lease("source:mj", "a", 30)
    assert await store.try_lease("source:mj", "a", 30)  # ours: renewed
    assert not await store.try_lease("source:mj", "b", 30)
    assert await store.try_lease("source:other", "b", 30)
    holder, left = await store.lease("source:mj") or ("", 0.0)
    assert holder == "a"
    assert 0 < left <= 30
    assert await store.renew_lease("source:mj", "a", 30)
    assert not await store.renew_lease("source:mj", "b", 30)

    await store.release_lease("source:mj", "b")  # not b's: nothing happens
    assert not await store.try_lease("source:mj", "b", 30)
    await store.release_lease("source:mj", "a")
    assert await store.lease("source:mj") is None
    assert await store.try_lease("source:mj", "b", 0.05)
    assert not await store.try_lease("source:mj", "a", 30)


async def test_an_expired_lease_goes_to_the_next_taker(store: Store) -> None:
    import asyncio

    assert await store.try_lease("source:mj", "a", 0.05)
    await asyncio.sleep(0.1)
    assert await store.lease("source:mj") is None
    assert await store.try_lease("source:mj", "b", 30)
    assert not await store.renew_lease("source:mj", "a", 30)
    assert (await store.lease("source:mj") or ("", 0))[0] == "b"


async def test_every_store_has_a_holder_name(store: Store) -> None:
    import os

    assert f":{os.getpid()}:" in store.holder


async def test_a_database_of_the_first_version_is_upgraded_with_its_data(tmp_path: Path) -> None:
    """A file made by the first release (schema 1: text keys everywhere, no messages or leases)
    is migrated in place: its events, pending deliveries and dead letters carry over."""
    path = tmp_path / "old.db"
    events = [make_event(n) for n in range(3)]
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SQLITE_MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        for n, event in enumerate(events):
            db.execute(
                "INSERT INTO events (id, type, source, subject, time, json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (event.id, event.type, event.source, event.subject, 1.0 + n, event_json(event)),
            )
            state, error = ("dead", "HTTP 400") if n == 2 else ("pending", None)
            db.execute(
                'INSERT INTO outbox (id, target, rule, event_id, title, body, "group", '
                "created_at, next_at, updated_at, last_error, state) "
                "VALUES (?, 'hook', 'r', ?, 't', 'b', NULL, 1.0, 1.0, 1.0, ?, ?)",
                (f"{event.id}:hook", event.id, error, state),
            )
    async with await Store.open(str(path)) as store:
        pending = await store.claim("hook", time.time(), 10)
        assert [i.event_id for i in pending] == [e.id for e in events[:2]]
        assert [i.payload for i in pending] == [event_json(e) for e in events[:2]]
        await store.mark_sent([i.id for i in pending])
        [dead] = await store.dead_letters()
        assert (dead.id, dead.last_error) == (f"{events[2].id}:hook", "HTTP 400")
        assert await store.replay([dead.id]) == 1
        [again] = await store.claim("hook", time.time(), 10)
        assert again.event.cloudevent() == events[2].cloudevent()
        await store.put_message("discord", "mj:1", "m")
        assert await store.get_message("discord", "mj:1") == "m"
        assert await store.outbox_depth() == {"hook": 1}


async def test_deliveries_to_a_removed_target_become_dead_letters(store: Store) -> None:
    events = [make_event(n) for n in range(3)]
    deliveries = [make_delivery(e, t) for e in events for t in ("kept", "gone")]
    await store.commit("mj", {}, events, deliveries)
    claimed = await store.claim("gone", time.time(), 1)  # in flight: its holder decides
    assert await store.abandon(["kept"]) == {"gone": 2}
    assert await store.outbox_depth() == {"kept": 3, "gone": 1}
    dead = await store.dead_letters()
    assert {d.target for d in dead} == {"gone"}
    assert all("no longer in the config" in (d.last_error or "") for d in dead)
    assert claimed[0].id not in {d.id for d in dead}
    assert await store.abandon(["kept", "gone"]) == {}

"""Retention: old sent deliveries and the events nothing needs any more are pruned, in batches;
dead letters, deliveries still owed and task states stay, so a finished task never emits again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.config.schema import Config
from bridge.diff import Snapshot, TaskState, diff
from bridge.errors import StoreError
from bridge.models import Event
from bridge.retention import prune_forever
from bridge.store import Store, open_store
from tests.receiver import make_delivery, make_event

DAY = 86400.0


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await open_store(str(tmp_path / "bridge.db")) as s:
        yield s


def aged(n: int | str, at: float, type: str = "task.succeeded") -> Event:
    """An event of task `n` detected at `at` (epoch seconds)."""
    event: Event = replace(make_event(n, type), time=datetime.fromtimestamp(at, UTC))
    return event


async def send_all(store: Store, target: str) -> list[str]:
    items = await store.claim(target, time.time() + 1, 10_000)
    await store.mark_sent([i.id for i in items])
    return [i.id for i in items]


async def later_than_now() -> float:
    """A cut-off strictly after every `updated_at` written so far, and before any written next."""
    await asyncio.sleep(0.01)
    cutoff = time.time()
    await asyncio.sleep(0.01)
    return cutoff


async def test_old_sent_deliveries_and_their_events_go_the_rest_stays(store: Store) -> None:
    old = time.time() - 10 * DAY
    sent = aged("sent", old)  # delivered twice long ago: both deliveries and the event go
    half = aged("half", old)  # one delivery sent, one a dead letter: the event stays
    dead = aged("dead", old)
    waiting = aged("waiting", old)  # still owed (pending): stays with its event
    flying = aged("flying", old)  # claimed, outcome not recorded yet: stays
    bare = aged("bare", old)  # no rule matched it: nothing needs it
    late = aged("late", old)  # an old event whose delivery went out only recently
    states = {
        "sent": TaskState("SUCCESS", 100, old, finished=True),
        "waiting": TaskState("IN_PROGRESS", 40, old),
    }
    await store.commit(
        "mj",
        states,
        [sent, half, dead, waiting, flying, bare, late],
        [
            make_delivery(sent, "a"),
            make_delivery(sent, "b"),
            make_delivery(half, "a"),
            make_delivery(half, "dead"),
            make_delivery(dead, "dead"),
            make_delivery(waiting, "wait"),
            make_delivery(flying, "fly"),
            make_delivery(late, "late"),
        ],
    )
    await send_all(store, "a")
    await send_all(store, "b")
    for item in await store.claim("dead", time.time() + 1, 10):
        await store.mark_dead(item.id, "HTTP 400")
    [in_flight] = await store.claim("fly", time.time() + 1, 10)
    cutoff = await later_than_now()
    await send_all(store, "late")
    await store.commit("mj", {}, [make_event("fresh")], [])  # recent, matched nothing

    assert await store.prune(cutoff) == (3, 2)

    assert {e.subject for e in await store.recent_events()} == {
        "half",
        "dead",
        "waiting",
        "flying",
        "late",
        "fresh",
    }
    assert {
        (r.item.event.subject, r.item.target, r.state) for r in await store.recent_deliveries()
    } == {
        ("half", "dead", "dead"),
        ("dead", "dead", "dead"),
        ("waiting", "wait", "pending"),
        ("flying", "fly", "inflight"),
        ("late", "late", "sent"),
    }
    assert {d.event.subject for d in await store.dead_letters()} == {"half", "dead"}
    assert await store.load_tasks("mj") == states  # task states are never pruned
    # what stays still works: the pending one is sent, the dead letters replay with their events
    [item] = await store.claim("wait", time.time() + 1, 10)
    assert item.event.id == waiting.id
    assert await store.replay(None) == 2
    assert {i.event.subject for i in await store.claim("dead", time.time() + 1, 10)} == {
        "half",
        "dead",
    }
    await store.mark_sent([in_flight.id])
    assert await store.prune(cutoff) == (0, 0)  # sent just now: not old


async def test_nothing_old_enough_nothing_pruned(store: Store) -> None:
    event = make_event(1)
    await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    await send_all(store, "hook")
    assert await store.prune(time.time() - 7 * DAY) == (0, 0)
    assert [e.id for e in await store.recent_events()] == [event.id]
    assert len(await store.recent_deliveries()) == 1


async def test_a_finished_task_never_emits_again_after_its_events_are_pruned(store: Store) -> None:
    old = time.time() - 10 * DAY
    snapshot = Snapshot([{"id": "1", "status": "SUCCESS", "progress": "100%", "prompt": "cat"}])
    first = diff("mj", {}, snapshot, now=old)
    assert [e.type for e in first.events] == ["task.succeeded"]
    await store.commit("mj", first.changed, first.events, [make_delivery(first.events[0], "hook")])
    await send_all(store, "hook")

    assert await store.prune(await later_than_now()) == (1, 1)
    assert await store.recent_events() == []

    # The upstream lists the old task again (a full re-read, a restart): its state says finished.
    previous = await store.load_tasks("mj")
    again = diff("mj", previous, snapshot, now=time.time())
    assert (again.events, again.changed) == ([], {})
    # Only the state stops it: the pruned event's id is free again and would be stored as new.
    assert await store.commit("mj", {}, first.events, []) == first.events


@pytest.mark.parametrize("batch", [1, 4, 5, 7, 1000])
async def test_prune_works_through_more_rows_than_one_batch(store: Store, batch: int) -> None:
    old = time.time() - 10 * DAY
    # One snapshot's events share their time: the walk must step through ties, not skip them.
    events = [aged(i, old) for i in range(20)]
    keep = {e.id for e in events[::3]}  # every third one becomes a dead letter
    await store.commit(
        "mj",
        {},
        events,
        [make_delivery(e, "dead" if e.id in keep else "hook") for e in events],
    )
    await send_all(store, "hook")
    for item in await store.claim("dead", time.time() + 1, 100):
        await store.mark_dead(item.id, "gone")
    bare = [aged(f"bare{i}", old + i) for i in range(6)]  # no deliveries, various times
    await store.commit("mj", {}, bare, [])

    assert await store.prune(await later_than_now(), batch=batch) == (20 - len(keep), 20 - 7 + 6)
    assert {e.id for e in await store.recent_events(100)} == keep
    assert len(await store.dead_letters()) == len(keep)


async def test_the_default_batch_holds_more_than_5000_rows(sqlite_store: Store) -> None:
    old = time.time() - 10 * DAY
    events = [aged(i, old + i % 3) for i in range(5200)]
    await sqlite_store.commit("mj", {}, events, [make_delivery(e, "hook") for e in events])
    await send_all(sqlite_store, "hook")
    assert await sqlite_store.prune(await later_than_now()) == (5200, 5200)
    assert await sqlite_store.recent_events() == []


# -- the loop ---------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait (up to 5s) until `check()` holds."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    pytest.fail("the condition never held")


async def old_sent(store: Store, n: int | str, now: float) -> None:
    event = aged(n, now - 8 * DAY)
    await store.commit("mj", {}, [event], [make_delivery(event, "hook")])
    await send_all(store, "hook")


async def test_prune_forever_prunes_at_start_and_then_every_period(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bridge.retention")
    store = sqlite_store
    now = time.time() + 8 * DAY  # a clock a week ahead: what is sent now is old to it
    await old_sent(store, 1, now)
    async with asyncio.TaskGroup() as group:
        loop = group.create_task(prune_forever(store, 7 * DAY, every=0.05, clock=lambda: now))
        await eventually(lambda: _empty(store))
        assert "pruned 1 sent deliveries and 1 events older than 7d" in caplog.text
        await old_sent(store, 2, now)  # the next round takes it
        await eventually(lambda: _empty(store))
        loop.cancel()
    assert caplog.text.count("pruned 1 sent deliveries") == 2
    assert all(r.levelno == logging.INFO for r in caplog.records)


async def _empty(store: Store) -> bool:
    return await store.recent_events() == [] and await store.recent_deliveries() == []


async def test_prune_forever_logs_a_store_error_and_goes_on(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    real = store.prune
    calls = 0

    async def flaky(before: float, **kwargs: Any) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("the database x is unreachable: boom")
        return await real(before, **kwargs)

    monkeypatch.setattr(store, "prune", flaky)
    now = time.time() + 8 * DAY
    await old_sent(store, 1, now)
    async with asyncio.TaskGroup() as group:
        loop = group.create_task(prune_forever(store, 7 * DAY, every=0.05, clock=lambda: now))
        await eventually(lambda: _empty(store))
        loop.cancel()
    assert calls >= 2
    assert "pruning failed" in caplog.text
    assert "boom" in caplog.text


async def test_retention_zero_keeps_everything(sqlite_store: Store) -> None:
    now = time.time() + 30 * DAY
    await old_sent(sqlite_store, 1, now)
    async with asyncio.timeout(5):
        await prune_forever(sqlite_store, 0, every=0.01, clock=lambda: now)  # returns at once
    assert len(await sqlite_store.recent_events()) == 1


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 7 * DAY), ("30d", 30 * DAY), ("12h", 12 * 3600.0), (0, 0.0)]
)
def test_retention_is_a_duration_in_rules_yaml(value: object, seconds: float) -> None:
    config = Config.model_validate({} if value is None else {"retention": value})
    assert config.retention == seconds

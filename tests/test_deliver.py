"""The deliverer with a real store, real webhook targets and a real local receiver: retries,
Retry-After, dead letters, replay, digests, concurrency, rate limits and draining."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.commands.dlq import format_dead_letters, list_command, replay_command
from bridge.commands.send_test import send_test, send_test_command
from bridge.config import AppriseTargetConfig, Config, TargetConfig, WebhookTargetConfig
from bridge.deliver import Deliverer
from bridge.deliver.lanes import (
    Retry,
    TargetHealth,
    TokenBucket,
    after_failure,
    backoff,
    units,
    why_give_up,
)
from bridge.errors import DeliveryError, Redactor
from bridge.store import OutboxItem, Store
from bridge.targets import Target, build_target, close_targets
from tests.receiver import Receiver, Reply, make_delivery, make_event


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(str(tmp_path / "bridge.db")) as s:
        yield s


def hook_config(rx: Receiver, **kw: Any) -> WebhookTargetConfig:
    return WebhookTargetConfig.model_validate({"webhook": rx.url + "/hook", **kw})


@asynccontextmanager
async def running(
    store: Store,
    targets: dict[str, Target],
    configs: dict[str, TargetConfig],
    **kw: Any,
) -> AsyncIterator[Deliverer]:
    deliverer = Deliverer(store, targets, configs, backoff_base=0.01, idle=0.2, **kw)
    task = asyncio.create_task(deliverer.run())
    try:
        yield deliverer
    finally:
        await deliverer.drain(2.0)
        await task
        await close_targets(targets.values())


@asynccontextmanager
async def hook(
    store: Store, session: aiohttp.ClientSession, rx: Receiver, **kw: Any
) -> AsyncIterator[Deliverer]:
    config = hook_config(rx, **kw)
    async with running(
        store, {"hook": build_target("hook", config, session)}, {"hook": config}
    ) as d:
        yield d


async def commit(
    store: Store, *numbers: int, target: str = "hook", group: str | None = None
) -> list[Any]:
    events = [make_event(n) for n in numbers]
    await store.commit("mj", {}, events, [make_delivery(e, target, group) for e in events])
    return events


async def settled(store: Store, within: float = 10.0) -> None:
    """Wait until nothing is pending or in flight."""
    async with asyncio.timeout(within):
        while await store.outbox_depth():  # noqa: ASYNC110 (the state lives in SQLite)
            await asyncio.sleep(0.02)


async def test_delivers_everything_and_marks_it_sent(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    events = await commit(store, *range(20))
    async with hook(store, session, rx) as d:
        got = await rx.wait_for(20)
        await settled(store)
    assert sorted(r.headers["webhook-id"] for r in got) == sorted(e.id for e in events)
    assert d.counts[("hook", "sent")] == 20
    assert await store.dead_letters() == []


async def test_wake_picks_up_new_deliveries_at_once(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    async with hook(store, session, rx) as d:
        d._idle = 60.0  # only wake() can get it going
        await asyncio.sleep(0.05)
        await commit(store, 1)
        d.wake()
        await rx.wait_for(1, within=5)


async def test_retries_after_5xx_then_succeeds_with_the_same_id(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    [event] = await commit(store, 1)
    rx.respond(500, 502)
    async with hook(store, session, rx) as d:
        got = await rx.wait_for(3)
        await settled(store)
    assert [r.headers["webhook-id"] for r in got] == [event.id] * 3
    assert d.counts[("hook", "retry")] == 2
    assert d.counts[("hook", "sent")] == 1


async def test_retry_after_is_honoured(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, 1)
    rx.respond(Reply(429, retry_after="1"))
    async with hook(store, session, rx):
        first, second = await rx.wait_for(2, within=5)
    # backoff_base is 10ms, so only Retry-After can explain a pause this long
    assert second.at - first.at >= 0.9


async def test_4xx_is_a_dead_letter_at_once_and_replay_delivers_it(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    [event] = await commit(store, 1)
    rx.respond(Reply(400, "missing field"))
    async with hook(store, session, rx) as d:
        await rx.wait_for(1)
        await settled(store)
        [dead] = await store.dead_letters()
        assert dead.event.id == event.id
        assert dead.attempts == 1
        assert dead.last_error is not None
        assert "HTTP 400: missing field" in dead.last_error
        assert len(rx.requests) == 1

        assert await store.replay([dead.id]) == 1
        d.wake()
        second = (await rx.wait_for(2))[1]
        await settled(store)
    assert second.headers["webhook-id"] == event.id
    assert await store.dead_letters() == []


async def test_max_attempts_makes_a_dead_letter(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, 1)
    rx.default = Reply(503)
    async with hook(store, session, rx, max_attempts=3):
        await rx.wait_for(3)
        await settled(store)
    [dead] = await store.dead_letters()
    assert dead.attempts == 3
    assert dead.last_error is not None
    assert "HTTP 503" in dead.last_error
    assert "3 attempts" in dead.last_error
    assert len(rx.requests) == 3


async def test_max_age_makes_a_dead_letter(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, 1)
    rx.default = Reply(503)
    async with hook(store, session, rx, max_age="1ms"):
        await rx.wait_for(1)
        await settled(store)
    [dead] = await store.dead_letters()
    assert dead.last_error is not None
    assert "max_age" in dead.last_error


async def test_timeouts_are_retried(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, 1)
    rx.respond(Reply(200, delay=1.0))
    async with hook(store, session, rx, timeout="100ms"):
        await rx.wait_for(2)
        await settled(store)
    assert await store.dead_letters() == []


async def test_digest_group_is_one_message(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    events = await commit(store, 1, 2, 3, group="mj:digest")
    await commit(store, 4)
    async with hook(store, session, rx) as d:
        await rx.wait_for(2)
        await settled(store)
    assert len(rx.requests) == 2
    batch = next(
        r for r in rx.requests if r.headers["content-type"].startswith("application/cloud")
    )
    assert [e["id"] for e in batch.json()] == [e.id for e in events]
    assert d.counts[("hook", "sent")] == 4


async def test_concurrency_bounds_sends_in_flight(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, *range(12))
    rx.default = Reply(200, delay=0.1)
    async with hook(store, session, rx, concurrency=3):
        await rx.wait_for(12)
        await settled(store)
    assert rx.peak == 3


class Flaky:
    """A target with a bug: it raises something that is not a DeliveryError, once."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, item: OutboxItem) -> None:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("surprise")

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        raise DeliveryError("no digests", retryable=False)


async def test_a_buggy_target_is_retried_not_fatal(store: Store, rx: Receiver) -> None:
    await commit(store, 1, target="flaky")
    flaky = Flaky()
    config = hook_config(rx)
    async with running(store, {"flaky": flaky}, {"flaky": config}) as d:
        await settled(store)
    assert flaky.calls == 2
    assert d.counts[("flaky", "retry")] == 1


async def test_drain_hands_unfinished_deliveries_back(
    tmp_path: Path, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    path = str(tmp_path / "b.db")
    async with await Store.open(path) as store:
        await commit(store, *range(6))
        rx.default = Reply(200, delay=5.0)
        config = hook_config(rx, concurrency=2)
        d = Deliverer(store, {"hook": build_target("hook", config, session)}, {"hook": config})
        task = asyncio.create_task(d.run())
        await rx.wait_for(2)
        await d.drain(0.1)
        await task
        assert await store.outbox_depth() == {"hook": 6}
        [item, *_] = await store.claim("hook", time.time(), 10)
        assert item.attempts == 0  # handed back, not counted as a failed attempt


async def test_rate_limit_paces_sends(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    await commit(store, *range(4))
    async with hook(store, session, rx, rate_limit="2/s"):
        got = await rx.wait_for(4, within=5)
    # a burst of 2, then one every 0.5s
    assert got[3].at - got[0].at >= 0.9


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2, 1.0, clock=lambda: now[0])
    assert [bucket.reserve(), bucket.reserve()] == [0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.5)
    assert bucket.reserve() == pytest.approx(1.0)
    now[0] = 10.0
    assert bucket.reserve() == 0.0


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(1, 2.5, 5.0), (2, 5.0, 10.0), (4, 20.0, 40.0), (7, 150.0, 300.0), (500, 150.0, 300.0)],
    ids=["first", "second", "fourth", "capped", "far-past-the-cap"],
)
def test_backoff_doubles_from_the_first_wait_to_the_cap_with_jitter(
    failures: int, low: float, high: float
) -> None:
    # The documented schedule (docs/delivery.md) with the defaults: backoff 5s, backoff_cap 5m.
    samples = [backoff(failures, 5.0, 300.0) for _ in range(500)]
    assert all(low <= s <= high for s in samples)
    assert max(samples) - min(samples) > (high - low) / 2  # spread, not in lockstep


def test_units_group_digests_and_keep_order() -> None:
    def it(n: int, group: str | None) -> OutboxItem:
        e = make_event(n)
        return OutboxItem(
            id=f"{n}",
            target="t",
            rule="r",
            event=e,
            title="",
            body="",
            group=group,
            attempts=0,
            created_at=0.0,
            next_at=0.0,
            last_error=None,
        )

    got = units([it(1, None), it(2, "g"), it(3, None), it(4, "g"), it(5, "h")])
    assert [[i.id for i in u] for u in got] == [["1"], ["2", "4"], ["3"], ["5"]]


@pytest.mark.parametrize(
    ("retry", "attempts", "age", "why"),
    [
        (True, 2, 10.0, None),
        (False, 1, 0.0, "not retryable"),
        (True, 3, 10.0, "gave up after 3 attempts"),
        (True, 2, 3600.0, "gave up: older than max_age (3600s)"),
    ],
    ids=["retried", "permanent", "out-of-attempts", "too-old"],
)
def test_a_failed_delivery_is_given_up_for_the_reason_the_dead_letter_shows(
    retry: bool, attempts: int, age: float, why: str | None
) -> None:
    config = WebhookTargetConfig(webhook="http://127.0.0.1:9/", max_attempts=3, max_age="1h")
    item = OutboxItem(
        id="d", target="t", rule="r", event=make_event(1), title="", body="", group=None,
        attempts=attempts - 1, created_at=0.0, next_at=0.0, last_error=None,
    )  # fmt: skip
    assert why_give_up(config, item, attempts, retry=retry, now=age) == why


# A target's health as (failing_since, failures): failing since t=900 after two tries, or up.
FAILING = (900.0, 2)
UP = (None, 0)


@pytest.mark.parametrize(
    ("before", "error", "probe", "probe_at", "retry", "after"),
    [
        (UP, DeliveryError("edit coalesced", retryable=False, deferred=True, retry_after=3.0),
         False, 0.0, Retry(1003.0, 0.0), UP),
        (UP, DeliveryError("HTTP 400", retryable=False), False, 0.0, Retry(None, 0.0), UP),
        (UP, DeliveryError("HTTP 503", retryable=True), False, 0.0,
         Retry(1010.0, 1010.0, 10.0), (1000.0, 1)),
        (UP, DeliveryError("HTTP 429", retryable=True, retry_after=45.0), False, 0.0,
         Retry(1045.0, 1045.0, 45.0), (1000.0, 1)),
        (FAILING, DeliveryError("HTTP 503", retryable=True), False, 1040.0,
         Retry(1040.0, 1040.0), FAILING),
        (FAILING, DeliveryError("HTTP 503", retryable=True), False, 990.0,
         Retry(1000.0, 990.0), FAILING),
        (FAILING, DeliveryError("HTTP 503", retryable=True), True, 990.0,
         Retry(1030.0, 1030.0, 30.0), (900.0, 3)),
    ],
    ids=[
        "deferred-not-the-targets-fault",
        "refused-for-good-a-dead-letter",
        "first-failure-starts-failing",
        "retry-after-instead-of-backoff",
        "in-flight-when-it-failed-waits-for-the-probe",
        "probe-time-passed-retried-now",
        "failed-probe-steps-the-backoff",
    ],
)  # fmt: skip
def test_a_failed_send_waits_for_the_failing_targets_next_probe(
    before: tuple[float | None, int],
    error: DeliveryError,
    probe: bool,
    probe_at: float,
    retry: Retry,
    after: tuple[float | None, int],
) -> None:
    health = TargetHealth(failing_since=before[0], failures=before[1])
    got = after_failure(
        health, error, str(error), probe=probe, probe_at=probe_at, now=1000.0,
        backoff=lambda failures: 10.0 * failures,
    )  # fmt: skip
    assert got == retry
    assert (health.failing_since, health.failures) == after
    assert health.last_error == (None if error.deferred else str(error))


# -- dead letters table and send-test (bridge/commands/) -------------------------------------------


async def test_dead_letter_table_lists_and_redacts(
    store: Store, session: aiohttp.ClientSession, rx: Receiver
) -> None:
    [event] = await commit(store, 1)
    leak = "see https://hooks.slack.com/services/T000/B000/XXXXSECRET and Bearer abc.def.ghi"
    rx.respond(Reply(403, leak))
    async with hook(store, session, rx):
        await rx.wait_for(1)
        await settled(store)
    dead = await store.history.dead()
    table = format_dead_letters(dead, Redactor(["abc.def"]))
    header, row, footer = table.splitlines()
    assert header.split() == [
        *("ID", "TARGET", "EVENT", "TASK", "CREATED", "DIED", "ATTEMPTS", "LAST", "ERROR")
    ]
    assert row.startswith(dead[0].item.id)
    assert "hook" in row
    assert "task.succeeded" in row
    assert " 1 " in row
    assert "HTTP 403" in row
    assert "XXXXSECRET" not in table
    assert "abc.def" not in table
    assert footer == "1 dead letter"
    assert format_dead_letters([]) == "no dead letters"
    assert event.id in row


async def test_send_test_reports_the_outcome(session: aiohttp.ClientSession, rx: Receiver) -> None:
    outcome = await send_test("hook", hook_config(rx, secret="plain-secret"), session)
    assert outcome.startswith("hook: accepted")
    [req] = await rx.wait_for(1)
    assert req.json()["type"] == "bridge.test"
    assert req.headers["webhook-signature"].startswith("v1,")

    rx.respond(Reply(401, "bad token plain-secret"))
    with pytest.raises(DeliveryError, match="HTTP 401") as info:
        await send_test("hook", hook_config(rx, secret="plain-secret"), session)
    assert "plain-secret" not in str(info.value)

    config = AppriseTargetConfig(url=f"json://127.0.0.1:{rx.port}/n")
    assert (await send_test("chat", config, session)).startswith("chat: accepted")
    assert (await rx.wait_for(3))[-1].json()["title"] == "mj-bridge test notification"


async def test_dlq_command_lists_and_replays(
    tmp_path: Path, session: aiohttp.ClientSession, rx: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "b.db")
    assert await list_command(db, None, as_json=False) == 2  # no database there: say so
    assert await replay_command(db, [], True) == 2  # nor is one made
    assert not (tmp_path / "b.db").exists()
    async with await Store.open(db) as store:
        await commit(store, 1, 2)
        for item in await store.claim("hook", time.time(), 10):
            await store.mark_dead(item.id, "hook: HTTP 410")
    capsys.readouterr()

    assert await list_command(db, None, as_json=False) == 0
    listing = capsys.readouterr().out
    assert "HTTP 410" in listing
    assert "2 dead letters" in listing
    first = listing.splitlines()[1].split()[0]

    assert await replay_command(db, [], False) == 2
    assert await replay_command(db, [first], True) == 2
    assert await replay_command(db, [first, "nope"], False) == 1
    assert "not dead letters: nope" in capsys.readouterr().err
    assert await replay_command(db, [], True) == 0
    assert "replayed 1 dead letter" in capsys.readouterr().out
    assert await list_command(db, None, as_json=False) == 0
    assert "no dead letters" in capsys.readouterr().out


async def test_send_test_command(rx: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    config = Config.model_validate(
        {"targets": {"hook": {"webhook": rx.url + "/hook", "secret": "topsecret-value"}}}
    )
    assert await send_test_command(config, "hook") == 0
    assert "hook: accepted" in capsys.readouterr().out
    assert await send_test_command(config, "nope") == 2
    assert "configured: hook" in capsys.readouterr().err
    rx.respond(Reply(403, "key topsecret-value refused"))
    assert await send_test_command(config, "hook") == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err
    assert "would not retry" in err
    assert "topsecret-value" not in err


async def test_a_receiver_down_for_150s_loses_nothing_and_is_probed_one_at_a_time(
    store: Store, session: aiohttp.ClientSession, rx: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The default schedule (5s doubling to 5m) tries about six times in 150 s; here the
    receiver refuses twelve tries, on a schedule shortened through the target's own config."""
    events = await commit(store, *range(40))
    refused = 12
    rx.respond(*[Reply(503, delay=0.02)] * refused)
    config = hook_config(rx, backoff="20ms", backoff_cap="100ms", concurrency=4)
    deliverer = Deliverer(
        store, {"hook": build_target("hook", config, session)}, {"hook": config}, idle=0.2
    )
    caplog.set_level("DEBUG", logger="bridge.deliver")
    task = asyncio.create_task(deliverer.run())
    try:
        await rx.wait_for(40 + refused, within=30)
        await settled(store)
    finally:
        await deliverer.drain(2.0)
        await task
    assert await store.dead_letters() == []
    ok = rx.requests[refused:]
    assert sorted({r.headers["webhook-id"] for r in ok}) == sorted(e.id for e in events)
    # At most `concurrency` were in flight when it started failing; after those, one at a time:
    # each try went out only once the one before it was answered.
    probes = rx.requests[4:refused]
    assert all(b.at - a.at >= 0.02 for a, b in itertools.pairwise(probes))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "is failing (hook: HTTP 503)" in warnings[0]
    assert "accepts deliveries again" in warnings[1]
    assert any(r.levelname == "DEBUG" and "retry" in r.getMessage() for r in caplog.records)

"""TaskAPI against a real local upstream: auth modes, capped lists with lookups by id, every
fault mapped to its reason, secrets kept out of messages; then source health decisions."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.config import SourceConfig
from bridge.diff import Snapshot, TaskState, diff
from bridge.errors import SourceError
from bridge.models import Event
from bridge.simulator import Simulator
from bridge.sources.health import SourceHealth
from bridge.sources.poll import TaskAPI

KEY = "sk-secret-4242"
TERMINAL_TYPES = {"task.succeeded", "task.failed", "task.cancelled", "task.vanished"}


def mj_task(tid: str, status: str = "SUCCESS", progress: str = "100%") -> dict[str, Any]:
    return {"id": tid, "status": status, "progress": progress, "action": "IMAGINE"}


class Upstream:
    """A minimal task API: the newest `cap` tasks on /list, any on /list-by-condition."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []
        self.cap: int | None = None
        self.fault: str | None = None
        self.by_ids_fault: str | None = None
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.release = asyncio.Event()
        self.url = ""
        self.accepts: tuple[str, str] | None = None  # (header, value): anything else is a 401

    def refused(self, request: web.Request) -> bool:
        return self.accepts is not None and request.headers.get(self.accepts[0]) != self.accepts[1]

    async def list(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("GET", request.path, dict(request.headers), None))
        if self.refused(request):
            return web.Response(status=401)
        if self.fault:
            return await self.misbehave(self.fault)
        tasks = self.tasks if self.cap is None else self.tasks[: self.cap]
        return web.Response(body=orjson.dumps(tasks), content_type="application/json")

    async def by_ids(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(("POST", request.path, dict(request.headers), body))
        if self.by_ids_fault:
            return await self.misbehave(self.by_ids_fault)
        wanted = set(body.get("ids") or [])
        found = [t for t in self.tasks if t["id"] in wanted]
        return web.Response(body=orjson.dumps(found), content_type="application/json")

    async def misbehave(self, fault: str) -> web.StreamResponse:
        match fault:
            case "timeout":
                await self.release.wait()
                return web.Response(text="[]")
            case "html":
                page = "<!doctype html><html><head><title>New API</title></head></html>"
                return web.Response(text=page, content_type="text/html")
            case "truncated":
                body = orjson.dumps([mj_task("1"), mj_task("2")])[:-7]
                return web.Response(body=body, content_type="application/json")
            case "malformed":
                return web.Response(text="[{'id': '1'}]", content_type="application/json")
            case "object":
                return web.json_response({"code": 4, "description": "task_no_found"})
            case "items":
                return web.json_response(["1748339029401828"])
            case "empty":
                return web.Response(body=b"", content_type="application/json")
            case "junk":
                return web.json_response([{"foo": 1}, {"id": None}])
            case "some_junk":
                return web.json_response([mj_task("9"), {"id": None}, {"id": ""}])
        return web.Response(status=int(fault), text=f"{fault} {KEY} echoed")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_get("/mj/task/list", up.list)
    app.router.add_post("/mj/task/list-by-condition", up.by_ids)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield up
    up.release.set()
    await runner.cleanup()


# Short enough for the timeout faults to be quick; the other tests give a slow (noisy, shared)
# machine time to answer, so a pause there never reads as a timeout.
QUICK_TIMEOUT = "300ms"


def source(url: str, session: aiohttp.ClientSession, **config: Any) -> TaskAPI:
    settings: dict[str, Any] = {"name": "mj", "base_url": url, "api_key": KEY, "timeout": "10s"}
    return TaskAPI(SourceConfig(**(settings | config)), session)


# --- the happy path -------------------------------------------------------------------------------


async def test_poll_reads_the_list_and_normalises(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.tasks = [mj_task("2"), {"id": "1", "status": None, "x": [1]}, {"status": "SUCCESS"}]
    src = source(upstream.url, session)
    snapshot = await src.poll()
    assert snapshot.tasks == [mj_task("2"), {"id": "1", "status": "", "x": [1]}]
    assert snapshot.missing == frozenset()
    assert snapshot.complete
    assert src.dropped == 1
    assert [r[:2] for r in upstream.requests] == [("GET", "/mj/task/list")]


async def test_a_list_of_junk_rows_is_a_bad_payload_not_an_empty_list(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.tasks = [mj_task("1", "IN_PROGRESS", "10%")]
    upstream.fault = "junk"
    with pytest.raises(SourceError, match=r"none of the 2 rows is a usable task") as e:
        await source(upstream.url, session).poll(tracked_unfinished=["1"])
    assert e.value.reason == "bad_payload"
    assert "no id: 2" in str(e.value)
    assert KEY not in str(e.value)


async def test_a_list_with_some_junk_is_used_but_concludes_nothing_missing(
    upstream: Upstream, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.tasks = [mj_task("2"), {"id": None, "status": "IN_PROGRESS"}]
    src = source(upstream.url, session)
    snapshot = await src.poll(tracked_unfinished=["1"])  # "1" may be the row without an id
    assert snapshot.tasks == [mj_task("2")]
    assert snapshot.missing == frozenset()
    assert src.dropped == 1
    assert ("POST", "/mj/task/list-by-condition") in [r[:2] for r in upstream.requests]
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("mj: 1 unusable task row(s) (no id: 1) from GET ")
    assert "no task is concluded missing" in line


@pytest.mark.parametrize(
    ("fault", "missing"),
    [(None, {"1"}), ("some_junk", set()), ("junk", None)],
    ids=["clean", "some-junk", "only-junk"],
)
async def test_a_lookup_with_junk_concludes_nothing(
    upstream: Upstream, session: aiohttp.ClientSession, fault: str | None, missing: set[str] | None
) -> None:
    upstream.tasks = [mj_task("2")]
    upstream.by_ids_fault = fault
    src = source(upstream.url, session)
    if missing is None:
        with pytest.raises(SourceError, match="list-by-condition: none of the 2 rows") as e:
            await src.poll(tracked_unfinished=["1"])
        assert e.value.reason == "bad_payload"
        return
    assert (await src.poll(tracked_unfinished=["1"])).missing == missing
    assert await src.lookup(["1"]) == ([], frozenset(missing))


async def test_steady_state_is_one_request_per_poll(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.tasks = [mj_task("1", "IN_PROGRESS", "10%"), mj_task("2")]
    src = source(upstream.url, session)
    for _ in range(3):
        await src.poll(tracked_unfinished=["1"])
    assert len(upstream.requests) == 3


@pytest.mark.parametrize(
    ("auth", "header", "value"),
    [
        ("bearer", "Authorization", f"Bearer {KEY}"),
        ("mj-api-secret", "mj-api-secret", KEY),
        ("raw", "Authorization", KEY),
        ("none", None, None),
    ],
    ids=["bearer", "mj-api-secret", "raw", "none"],
)
async def test_auth_modes(
    upstream: Upstream,
    session: aiohttp.ClientSession,
    auth: str,
    header: str | None,
    value: str | None,
) -> None:
    upstream.tasks = [mj_task("1", "IN_PROGRESS")]
    upstream.cap = 0  # forces a lookup so both endpoints are checked
    await source(upstream.url, session, auth=auth).poll(tracked_unfinished=["1"])
    assert len(upstream.requests) == 2
    for _, _, headers, _ in upstream.requests:
        sent = {k.lower(): v for k, v in headers.items()}
        if header is None:
            assert "authorization" not in sent
            assert "mj-api-secret" not in sent
        else:
            assert sent[header.lower()] == value
            assert KEY not in str({k: v for k, v in sent.items() if k != header.lower()})


async def test_capped_list_looks_up_missing_ids_in_batches_of_100(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.tasks = [mj_task(f"n{i}") for i in range(100)]  # the newest 100, all listed
    upstream.tasks += [mj_task(f"old{i}", "IN_PROGRESS", "50%") for i in range(230)]
    upstream.cap = 100
    tracked = [f"old{i}" for i in range(230)] + ["gone1", "gone2", "n5"]
    snapshot = await source(upstream.url, session).poll(tracked_unfinished=tracked)
    lookups = [body["ids"] for method, _, _, body in upstream.requests if method == "POST"]
    assert [len(ids) for ids in lookups] == [100, 100, 32]
    assert sorted(i for ids in lookups for i in ids) == sorted(set(tracked) - {"n5"})
    ids = [t["id"] for t in snapshot.tasks]
    assert len(ids) == 330
    assert set(ids) == {t["id"] for t in upstream.tasks}
    assert snapshot.missing == frozenset({"gone1", "gone2"})


async def test_lookup(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    upstream.tasks = [mj_task(str(i)) for i in range(150)]
    found, gone = await source(upstream.url, session).lookup([str(i) for i in range(140, 160)] * 2)
    assert [t["id"] for t in found] == [str(i) for i in range(140, 150)]
    assert gone == {str(i) for i in range(150, 160)}
    posts = [body["ids"] for method, _, _, body in upstream.requests if method == "POST"]
    assert posts == [[str(i) for i in range(140, 160)]]


async def test_lookup_keeps_only_the_ids_asked_for(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """A server that ignores the ids and answers with everything must not fake a lookup."""
    upstream.tasks = [mj_task("a"), mj_task("b")]
    upstream.cap = 0
    original = upstream.by_ids

    async def everything(request: web.Request) -> web.StreamResponse:
        await original(request)
        return web.json_response(upstream.tasks)

    upstream.by_ids = everything  # type: ignore[method-assign]
    found, _ = await source(upstream.url, session).lookup(["a"])
    assert [t["id"] for t in found] == ["a"]


# --- faults ---------------------------------------------------------------------------------------

FAULTS = [
    ("timeout", "timeout", "no answer within 0.3s"),
    ("500", "server_error", "HTTP 500"),
    ("502", "server_error", "HTTP 502"),
    ("503", "server_error", "HTTP 503"),
    ("429", "rate_limited", "HTTP 429"),
    ("401", "auth_failed", "HTTP 401"),
    ("403", "auth_failed", "HTTP 403"),
    ("404", "not_a_task_api", "HTTP 404"),
    ("400", "server_error", "HTTP 400"),
    ("html", "not_a_task_api", "answered text/html.*new-api relays do not serve /mj/task/list"),
    ("truncated", "bad_payload", "not valid JSON"),
    ("malformed", "bad_payload", "not valid JSON"),
    ("object", "bad_payload", "got a JSON object"),
    ("items", "bad_payload", "item 0 is a JSON string"),
    ("empty", "bad_payload", "empty"),
]


@pytest.mark.parametrize(("fault", "reason", "message"), FAULTS, ids=[f[0] for f in FAULTS])
@pytest.mark.parametrize("endpoint", ["list", "list-by-condition"])
async def test_faults(
    upstream: Upstream,
    session: aiohttp.ClientSession,
    fault: str,
    reason: str,
    message: str,
    endpoint: str,
) -> None:
    upstream.tasks = [mj_task("1", "IN_PROGRESS", "10%")]
    if endpoint == "list":
        upstream.fault = fault
    else:
        upstream.cap = 0
        upstream.by_ids_fault = fault
    timeout = QUICK_TIMEOUT if fault == "timeout" else "10s"
    with pytest.raises(SourceError, match=message) as caught:
        await source(upstream.url, session, timeout=timeout).poll(tracked_unfinished=["1"])
    assert caught.value.reason == reason
    assert KEY not in str(caught.value)
    assert upstream.url in str(caught.value)


async def test_refused_connection_is_unreachable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match=r"cannot connect to 127\.0\.0\.1") as caught:
        await source(f"http://127.0.0.1:{port}", session).poll()
    assert caught.value.reason == "unreachable"


async def test_connection_cut_mid_body_is_bad_payload(session: aiohttp.ClientSession) -> None:
    """Content-Length promises more than arrives before the server hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            b'[{"id":"1","status":"SUCCESS"}'
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(SourceError) as caught:
            await source(f"http://127.0.0.1:{port}", session).poll()
    assert caught.value.reason == "bad_payload"


async def test_server_that_hangs_up_without_answering_is_unreachable(
    session: aiohttp.ClientSession,
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(SourceError) as caught:
            await source(f"http://127.0.0.1:{port}", session).poll()
    assert caught.value.reason == "unreachable"


async def test_credentials_in_base_url_are_redacted(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.fault = "500"
    url = upstream.url.replace("http://", "http://admin:hunter22@")
    with pytest.raises(SourceError) as caught:
        await source(url, session, auth="none").poll()
    assert caught.value.reason == "server_error"
    assert "hunter22" not in str(caught.value)
    with pytest.raises(SourceError) as caught:  # two Authorization headers cannot be sent
        await source(url, session, auth="bearer").poll()
    assert caught.value.reason == "unreachable"
    assert "hunter22" not in str(caught.value)
    assert KEY not in str(caught.value)


async def test_session_is_left_open(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    upstream.fault = "500"
    with pytest.raises(SourceError):
        await source(upstream.url, session).poll()
    assert not session.closed


# --- health ---------------------------------------------------------------------------------------


def test_health_down_after_three_failures_then_up_once() -> None:
    health = SourceHealth("mj")
    assert health.failure("timeout", 100.0, "no answer") is None
    assert health.failure("timeout", 105.0, "no answer") is None
    down = health.failure("auth_failed", 110.0, "HTTP 401")
    assert down is not None
    assert down.type == "source.down"
    assert down.source == down.subject == "mj"
    assert down.data["reason"] == "auth_failed"
    assert down.data["message"] == "HTTP 401"
    assert down.data["since"] == "1970-01-01T00:01:40.000Z"
    assert health.failure("timeout", 115.0) is None
    assert health.down
    up = health.success(120.0)
    assert up is not None
    assert up.type == "source.up"
    assert up.data["down_for"] == 20.0
    assert health.success(125.0) is None
    assert down.id != up.id


def test_health_ids_are_deterministic_from_when_the_outage_began() -> None:
    def outage(start: float) -> list[str]:
        health = SourceHealth("mj")
        events = [health.failure("timeout", start + i) for i in range(4)]
        events.append(health.success(start + 10))
        return [e.id for e in events if e is not None]

    assert outage(100.0) == outage(100.0)
    assert outage(100.0) != outage(200.0)
    assert len(outage(100.0)) == 2


def test_health_a_success_resets_the_count() -> None:
    health = SourceHealth("mj")
    for t in range(10):
        assert health.failure("timeout", t * 2.0) is None
        assert health.failure("timeout", t * 2.0 + 1) is None
        assert health.success(t * 2.0 + 1.5) is None


@pytest.mark.parametrize(
    ("interval", "failures", "expected"),
    [
        (5.0, 0, 5.0),
        (5.0, 1, 10.0),
        (5.0, 2, 20.0),
        (5.0, 3, 40.0),
        (5.0, 4, 50.0),  # 10 x interval
        (0.05, 50, 0.5),
        (10.0, 9, 60.0),  # max_backoff
        (120.0, 3, 120.0),  # never below the interval
    ],
    ids=lambda v: str(v),
)
def test_backoff(interval: float, failures: int, expected: float) -> None:
    health = SourceHealth("mj")
    for t in range(failures):
        health.failure("timeout", float(t))
    assert health.backoff(interval) == pytest.approx(expected)


# --- against the simulator, every flavour -------------------------------------------------------

AUTH_OF = {"midjourney-proxy": "mj-api-secret", "trueai": "raw", "new-api": "bearer"}
SIM_FAULTS = {
    "timeout": "timeout",
    "500": "server_error",
    "502": "server_error",
    "401": "auth_failed",
    "403": "auth_failed",
    "429": "rate_limited",
    "html": "not_a_task_api",
    "truncated": "bad_payload",
    "malformed": "bad_payload",
    "wrong_shape": "bad_payload",
    "empty": "bad_payload",
}


class Watch:
    """The poll -> diff loop the bridge runs, reduced to what these tests look at."""

    def __init__(self, src: TaskAPI, *, by_ids: bool = False) -> None:
        self.src = src
        self.by_ids = by_ids  # new-api: no list, only lookups of known ids
        self.states: dict[str, TaskState] = {}
        self.events: list[Event] = []
        self.now = 1000.0

    async def look(self, *known: str) -> list[str]:
        self.now += 1.0
        unfinished = [tid for tid, s in self.states.items() if not s.finished]
        if self.by_ids:
            ids = list(dict.fromkeys([*unfinished, *known]))
            found, gone = await self.src.lookup(ids)
            snapshot = Snapshot(found, gone, complete=False)
        else:
            snapshot = await self.src.poll(unfinished)
        result = diff("mj", self.states, snapshot, now=self.now)
        self.states |= result.changed
        self.events += result.events
        return [e.type for e in result.events]

    def types(self, tid: str) -> list[str]:
        return [e.type for e in self.events if e.subject == tid]


@pytest.fixture(params=["midjourney-proxy", "trueai", "new-api"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Simulator]:
    async with Simulator(request.param, api_key=KEY) as simulator:
        yield simulator


def sim_source(sim: Simulator, session: aiohttp.ClientSession, **config: Any) -> TaskAPI:
    return source(sim.url, session, auth=AUTH_OF[sim.flavor], **config)


OUTCOMES = [
    ("success", True, "task.succeeded"),
    ("failure", True, "task.failed"),
    ("banned", False, "task.failed"),
    ("cancel", True, "task.cancelled"),
    ("timeout", True, "task.failed"),
]


@pytest.mark.parametrize(("outcome", "runs", "last"), OUTCOMES, ids=[o[0] for o in OUTCOMES])
async def test_simulated_lifecycles_emit_each_change_once(
    sim: Simulator, session: aiohttp.ClientSession, outcome: str, runs: bool, last: str
) -> None:
    watch = Watch(sim_source(sim, session), by_ids=sim.flavor == "new-api")
    sim.seed_tasks(20)
    tid = sim.add_task("a cat", outcome=outcome, steps=3)
    await watch.look(tid)
    for _ in range(12):
        sim.tick()
        await watch.look()
        assert await watch.look() == []  # the same state read twice emits nothing
    types = watch.types(tid)
    assert types[0] == "task.submitted"
    assert ("task.started" in types) == runs
    assert types[-1] == last
    assert sum(t in TERMINAL_TYPES for t in types) == 1
    assert len(watch.events) == len({e.id for e in watch.events})


async def test_simulated_modal_then_submitted(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    watch = Watch(sim_source(sim, session), by_ids=sim.flavor == "new-api")
    tid = sim.add_task("zoom", outcome="modal")
    await watch.look(tid)
    assert sim.modal(tid)
    for _ in range(10):
        sim.tick()
        await watch.look()
    types = watch.types(tid)
    assert types[0] == "task.modal"
    assert "task.submitted" in types
    assert types[-1] == "task.succeeded"


async def test_simulated_cancel(sim: Simulator, session: aiohttp.ClientSession) -> None:
    watch = Watch(sim_source(sim, session), by_ids=sim.flavor == "new-api")
    tid = sim.add_task("a cat", steps=4)
    sim.tick(2)
    await watch.look(tid)
    assert sim.cancel(tid)
    await watch.look()
    # trueai's cancel sets FAILURE "取消任务"; midjourney-proxy/plus and new-api report CANCEL.
    final = "task.failed" if sim.flavor == "trueai" else "task.cancelled"
    assert watch.types(tid) == ["task.started", final]


async def test_trueai_capped_list_is_completed_by_lookups(session: aiohttp.ClientSession) -> None:
    async with Simulator("trueai", api_key=KEY) as sim:
        watch = Watch(sim_source(sim, session))
        tid = sim.add_task("the old one", steps=3)
        await watch.look()
        for i in range(120):  # 120 newer tasks push it out of the newest 100
            sim.add_task(f"newer {i}", steps=50)
        sim.requests.clear()
        for _ in range(6):
            sim.tick()
            await watch.look()
        assert watch.types(tid)[0] == "task.submitted"
        assert watch.types(tid)[-1] == "task.succeeded"
        assert ("POST", "/mj/task/list-by-condition") in sim.requests
        # Once it finished, nothing is looked up any more: one request per poll.
        sim.requests.clear()
        await watch.look()
        assert sim.requests == [("GET", "/mj/task/list")]


async def test_vanished_only_after_two_lookups_found_nothing(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    watch = Watch(sim_source(sim, session), by_ids=sim.flavor == "new-api")
    tid = sim.add_task("a cat", steps=5)
    sim.tick(2)
    await watch.look(tid)
    sim.remove_task(tid)
    assert await watch.look() == []
    assert await watch.look() == ["task.vanished"]
    assert await watch.look() == []
    assert watch.types(tid) == ["task.started", "task.vanished"]


async def test_new_api_list_is_not_a_task_api(session: aiohttp.ClientSession) -> None:
    async with Simulator("new-api", api_key=KEY) as sim:
        sim.add_task()
        with pytest.raises(SourceError, match=r"text/html.*new-api relays") as caught:
            await sim_source(sim, session).poll()
    assert caught.value.reason == "not_a_task_api"


@pytest.mark.parametrize("fault", list(SIM_FAULTS))
async def test_simulated_faults(sim: Simulator, session: aiohttp.ClientSession, fault: str) -> None:
    timeout = QUICK_TIMEOUT if fault == "timeout" else "10s"
    watch = Watch(sim_source(sim, session, timeout=timeout), by_ids=sim.flavor == "new-api")
    health = SourceHealth("mj")
    tid = sim.add_task("a cat", steps=3)
    sim.tick(2)
    await watch.look(tid)
    before = (dict(watch.states), len(watch.events))
    sim.fault = fault
    downs = []
    for i in range(4):
        with pytest.raises(SourceError) as caught:
            await watch.look()
        assert caught.value.reason == SIM_FAULTS[fault]
        assert KEY not in str(caught.value)
        downs.append(health.failure(caught.value.reason, float(i), str(caught.value)))
    assert [d is not None for d in downs] == [False, False, True, False]
    assert (watch.states, len(watch.events)) == before  # a fault never invents task events
    sim.fault = None
    sim.tick(10)
    await watch.look()
    up = health.success(10.0)
    assert up is not None
    assert up.type == "source.up"
    assert watch.types(tid)[-1] == "task.succeeded"


async def test_simulated_wrong_key_is_auth_failed(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    src = source(sim.url, session, auth=AUTH_OF[sim.flavor], api_key="sk-wrong-key")
    with pytest.raises(SourceError) as caught:
        await src.lookup(["1"])
    assert caught.value.reason == "auth_failed"
    assert "sk-wrong-key" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "value", "scheme"),
    [("Authorization", f"Bearer {KEY}", "bearer"), ("Authorization", KEY, "raw")],
    ids=["bearer", "raw"],
)
async def test_auth_left_out_is_detected_once_on_a_401(
    upstream: Upstream,
    session: aiohttp.ClientSession,
    header: str,
    value: str,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", "bridge.sources")
    upstream.tasks = [mj_task("1")]
    upstream.accepts = (header, value)
    src = source(upstream.url, session)  # no auth: in the config
    assert (await src.poll()).tasks == [mj_task("1")]
    assert src.auth == scheme
    assert f"accepts auth '{scheme}' (detected)" in caplog.text
    tried = len(upstream.requests)
    await src.poll()
    assert len(upstream.requests) == tried + 1  # adopted: no more guessing
    assert upstream.requests[-1][2][header] == value


async def test_a_wrong_configured_auth_is_named_with_the_one_that_works(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.accepts = ("mj-api-secret", KEY)
    with pytest.raises(SourceError, match=r"set `auth: mj-api-secret` on source mj") as caught:
        await source(upstream.url, session, auth="bearer").poll()
    assert caught.value.reason == "auth_failed"
    assert KEY not in str(caught.value)


async def test_a_key_refused_in_every_scheme_says_so(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.accepts = ("mj-api-secret", "another-key")
    src = source(upstream.url, session)
    with pytest.raises(SourceError, match=r"refused in every scheme .*check api_key"):
        await src.poll()
    assert len(upstream.requests) == 3  # each scheme once
    with pytest.raises(SourceError, match="HTTP 401"):
        await src.poll()
    assert len(upstream.requests) == 4  # tried once, not at every poll

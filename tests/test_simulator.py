"""The upstream simulator, driven over real HTTP for each flavour: auth, lifecycles, list shapes,
lookups, submits, notifyHook callbacks and injected faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.simulator import FAULTS, Simulator, auth_header, serve

KEY = "sim-key"
HEADERS = {
    "midjourney-proxy": {"mj-api-secret": KEY},
    "nz": {"mj-api-secret": KEY},
    "trueai": {"Authorization": KEY},
    "new-api": {"Authorization": f"Bearer {KEY}"},
}
FLAVORS = tuple(HEADERS)
NZ_KEYS = [
    "id",
    "properties",
    "action",
    "status",
    "prompt",
    "promptEn",
    "description",
    "state",
    "submitTime",
    "startTime",
    "finishTime",
    "imageUrl",
    "progress",
    "failReason",
    "buttons",
]
NEW_API_KEYS = [
    "id",
    "action",
    "customId",
    "botType",
    "prompt",
    "promptEn",
    "description",
    "state",
    "submitTime",
    "startTime",
    "finishTime",
    "imageUrl",
    "videoUrl",
    "videoUrls",
    "status",
    "progress",
    "failReason",
    "buttons",
    "maskBase64",
    "properties",
]

MakeSim = Callable[..., Awaitable[Simulator]]


class Reply:
    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(flavor: str = "midjourney-proxy", **kwargs: Any) -> Simulator:
        sim = Simulator(flavor, **kwargs)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


async def call(
    session: aiohttp.ClientSession,
    sim: Simulator,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    sent = HEADERS[sim.flavor] if headers is None else headers
    async with session.request(method, sim.url + path, json=body, headers=sent) as resp:
        return Reply(resp.status, resp.content_type, await resp.read())


# auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "headers", "ok"),
    [
        ("midjourney-proxy", {"mj-api-secret": KEY}, True),
        ("midjourney-proxy", {"mj-api-secret": "wrong"}, False),
        ("midjourney-proxy", {"Authorization": f"Bearer {KEY}"}, False),
        ("nz", {"mj-api-secret": KEY}, True),
        ("nz", {"mj-api-secret": "wrong"}, False),
        ("trueai", {"Authorization": KEY}, True),
        ("trueai", {"Mj-Api-Secret": KEY}, True),
        ("trueai", {"Authorization": f"Bearer {KEY}"}, False),
        ("new-api", {"Authorization": f"Bearer {KEY}"}, True),
        ("new-api", {"mj-api-secret": KEY}, True),
        ("new-api", {"Authorization": "Bearer nope"}, False),
        ("new-api", {}, False),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "|".join(f"{k}={x}" for k, x in v.items()),
)
async def test_auth_answers_as_the_flavour_does(
    make_sim: MakeSim,
    session: aiohttp.ClientSession,
    flavor: str,
    headers: dict[str, str],
    ok: bool,
) -> None:
    sim = await make_sim(flavor)
    task_id = sim.add_task()
    reply = await call(session, sim, f"/mj/task/{task_id}/fetch", headers=headers)
    if ok:
        assert reply.status == 200
        assert reply.json()["id"] == task_id
        return
    assert reply.status == 401
    match flavor:
        case "midjourney-proxy" | "nz":
            assert reply.body == b""
        case "trueai":
            assert reply.content_type == "text/plain"
            assert reply.body == b"Authorization header missing."
        case "new-api":
            error = reply.json()["error"]
            assert error["type"] == "new_api_error"
            assert error["message"].startswith("无效的令牌")


async def test_no_api_key_means_no_auth(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim(api_key=None)
    reply = await call(session, sim, "/mj/task/list", headers={})
    assert reply.status == 200
    assert reply.json() == []


def test_auth_header_names_the_flavours_header() -> None:
    assert auth_header("midjourney-proxy", "k") == "mj-api-secret: k"
    assert auth_header("trueai", "k") == "Authorization: k"
    assert auth_header("new-api", "k") == "Authorization: Bearer k"
    assert auth_header("trueai", None) is None


# lifecycles -------------------------------------------------------------------------------------


async def test_success_lifecycle_midjourney_proxy(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("plus")
    task_id = sim.add_task("dog playing ball", steps=4)
    seen: list[dict[str, Any]] = []
    for _ in range(7):
        seen.append((await call(session, sim, f"/mj/task/{task_id}/fetch")).json())
        sim.tick()
    statuses = [t["status"] for t in seen]
    assert statuses == ["NOT_START", "SUBMITTED", *["IN_PROGRESS"] * 4, "SUCCESS", *[]]
    assert [t["progress"] for t in seen][:2] == [None, "0%"]
    progress = [int(t["progress"].rstrip("%")) for t in seen[2:6]]
    assert progress == sorted(progress)
    assert len(set(progress)) == 4
    assert all(t["imageUrl"].endswith(".webp") for t in seen[2:6])
    assert seen[0]["startTime"] is None
    assert seen[1]["startTime"] is not None
    done = seen[-1]
    assert list(done) == NZ_KEYS
    assert done["progress"] == "100%"
    assert done["finishTime"] >= done["startTime"] >= done["submitTime"]
    # Discord's CDN path, served by the simulator itself: a bridge that downloads it stays local.
    assert done["imageUrl"].startswith(sim.url + "/attachments/")
    assert done["imageUrl"].endswith(".png")
    async with session.get(done["imageUrl"]) as image:
        assert image.status == 200
        assert image.content_type == "image/png"
    assert done["description"] == "/imagine dog playing ball"
    props = done["properties"]
    assert props["discordInstanceId"]
    assert props["botType"] == "MID_JOURNEY"
    assert props["finalPrompt"] == "dog playing ball --v 7.0"
    labels = [b["label"] or b["emoji"] for b in done["buttons"]]
    assert labels == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4"]
    assert all(props["messageHash"] in b["customId"] for b in done["buttons"])
    assert done["buttons"][0]["customId"] == f"MJ::JOB::upsample::1::{props['messageHash']}"
    assert all(not t["buttons"] for t in seen[:-1])
    # Finished tasks stay put.
    sim.tick(3)
    assert sim.task(task_id) == {**done, "buttons": done["buttons"]}


@pytest.mark.parametrize(
    ("outcome", "status", "reason"),
    [
        ("failure", "FAILURE", "[Invalid parameter] Invalid aspect ratio"),
        ("banned", "FAILURE", "[Banned prompt detected]"),
        ("timeout", "FAILURE", "任务超时"),
        ("cancel", "CANCEL", None),
    ],
)
def test_unhappy_outcomes_end_as_upstream_ends_them(
    outcome: str, status: str, reason: str | None
) -> None:
    sim = Simulator()
    task_id = sim.add_task(outcome=outcome, steps=4)
    sim.tick(20)
    task = sim.task(task_id)
    assert task is not None
    assert task["status"] == status
    assert task["finishTime"] is not None
    assert task["buttons"] == []
    if reason is None:
        assert task["failReason"] is None
    else:
        assert task["failReason"].startswith(reason)
        assert task["progress"] == ""


def test_timeout_stalls_before_failing() -> None:
    sim = Simulator()
    task_id = sim.add_task(outcome="timeout", steps=3)
    sim.tick(2)
    stuck = sim.task(task_id)
    assert stuck is not None
    assert stuck["status"] == "IN_PROGRESS"
    sim.tick(3)
    assert sim.task(task_id) == stuck
    sim.tick()
    assert (sim.task(task_id) or {})["failReason"] == "任务超时"


def test_custom_fail_reason_and_task_id() -> None:
    sim = Simulator()
    task_id = sim.add_task(outcome="failure", fail_reason="Failed to upload", task_id="1" * 16)
    assert task_id == "1" * 16
    sim.tick(10)
    assert (sim.task(task_id) or {})["failReason"] == "Failed to upload"
    with pytest.raises(ValueError, match="exists"):
        sim.add_task(task_id=task_id)
    with pytest.raises(ValueError, match="outcome"):
        sim.add_task(outcome="exploded")


async def test_modal_waits_for_submit_modal(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    task_id = sim.add_task(outcome="modal")
    sim.tick(5)
    assert (sim.task(task_id) or {})["status"] == "MODAL"
    reply = await call(
        session, sim, "/mj/submit/modal", method="POST", body={"taskId": task_id, "prompt": "x"}
    )
    assert reply.json()["code"] == 1
    assert reply.json()["result"] == task_id
    sim.tick(10)
    assert (sim.task(task_id) or {})["status"] == "SUCCESS"
    again = await call(session, sim, "/mj/submit/modal", method="POST", body={"taskId": task_id})
    assert again.json()["code"] == 4
    unknown = await call(session, sim, "/mj/submit/modal", method="POST", body={"taskId": "0"})
    assert unknown.json()["code"] == 3


async def test_trueai_task_shape(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim("trueai")
    task_id = sim.add_task(steps=2)
    sim.tick(2)
    running = (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()
    assert running["status"] == "IN_PROGRESS"
    assert running["imageUrl"] is None
    for key in ("botType", "mode", "seed", "imageUrls", "promptFull", "instanceId", "properties"):
        assert key in running
    sim.tick(5)
    done = (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()
    assert done["status"] == "SUCCESS"
    assert done["imageUrls"][0]["url"] == done["imageUrl"]
    assert done["seed"].isdigit()
    assert len(done["buttons"]) == 9


async def test_new_api_task_shape(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim("new-api")
    task_id = sim.add_task(steps=2)
    failing = sim.add_task(outcome="banned")
    fresh = (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()
    assert list(fresh) == NEW_API_KEYS
    assert (fresh["status"], fresh["progress"]) == ("", "0%")
    assert (fresh["customId"], fresh["botType"], fresh["maskBase64"]) == ("", "", "")
    assert fresh["startTime"] == 0
    assert set(fresh["properties"]) == {"finalPrompt", "finalZhPrompt"}
    assert re.fullmatch(rf"{sim.url}/mj/image/{task_id}\?rand=\d+", fresh["imageUrl"])
    again = (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()
    assert again["imageUrl"] != fresh["imageUrl"]
    sim.tick(10)
    done = (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()
    assert done["status"] == "SUCCESS"
    assert done["imageUrl"] == f"{sim.url}/mj/image/{task_id}"
    failed = (await call(session, sim, f"/mj/task/{failing}/fetch")).json()
    assert (failed["status"], failed["progress"]) == ("FAILURE", "100%")
    image = await call(session, sim, f"/mj/image/{task_id}", headers={})
    assert (image.status, image.content_type) == (200, "image/png")


# lists ------------------------------------------------------------------------------------------


async def test_list_is_uncapped_newest_first(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.seed_tasks(150)
    newest = [sim.add_task(f"task {i}") for i in range(3)]
    tasks = (await call(session, sim, "/mj/task/list")).json()
    assert len(tasks) == 153
    assert [t["id"] for t in tasks[:3]] == newest[::-1]
    times = [t["submitTime"] for t in tasks]
    assert times == sorted(times, reverse=True)
    ids = [t["id"] for t in tasks]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"\d{16}", i) for i in ids)
    assert {t["status"] for t in tasks[3:]} <= {"SUCCESS", "FAILURE"}


async def test_big_list_streams_valid_json(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.seed_tasks(4500)
    reply = await call(session, sim, "/mj/task/list")
    tasks = reply.json()
    assert len(tasks) == 4500
    assert tasks[0]["submitTime"] > tasks[-1]["submitTime"]
    assert sim.bytes_sent >= len(reply.body)


async def test_list_caps(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    trueai = await make_sim("trueai")
    trueai.seed_tasks(120)
    newest = trueai.add_task()
    tasks = (await call(session, trueai, "/mj/task/list")).json()
    assert len(tasks) == 100
    assert tasks[0]["id"] == newest
    capped = await make_sim(list_cap=5)
    capped.seed_tasks(10)
    assert len((await call(session, capped, "/mj/task/list")).json()) == 5


async def test_removed_task_leaves_the_list(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    keep, gone = sim.add_task(), sim.add_task()
    assert len((await call(session, sim, "/mj/task/list")).json()) == 2
    sim.remove_task(gone)
    tasks = (await call(session, sim, "/mj/task/list")).json()
    assert [t["id"] for t in tasks] == [keep]
    assert sim.task(gone) is None


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_list_by_condition(
    make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str
) -> None:
    sim = await make_sim(flavor)
    done = sim.add_task(steps=0)
    sim.tick(3)
    running = sim.add_task()
    ids = [done, "1111111111111111", running]
    reply = await call(session, sim, "/mj/task/list-by-condition", method="POST", body={"ids": ids})
    found = [t["id"] for t in reply.json()]
    if flavor in ("midjourney-proxy", "nz"):
        assert found == [running, done]  # the running queue answers first
    else:
        assert found == [done, running]
    empty = await call(session, sim, "/mj/task/list-by-condition", method="POST", body={"ids": []})
    assert empty.json() == []
    alias = await call(
        session, sim, "/mj/task/list-by-ids", method="POST", body={"ids": [f" {done} "]}
    )
    if flavor == "trueai":
        assert [t["id"] for t in alias.json()] == [done]
    elif flavor in ("midjourney-proxy", "nz"):
        assert alias.status == 404
    else:
        assert alias.content_type == "text/html"


@pytest.mark.parametrize(
    ("flavor", "status", "body"),
    [
        ("midjourney-proxy", 200, b""),
        ("trueai", 204, b""),
        ("new-api", 400, b'{"description":"task_no_found","type":"upstream_error","code":4}'),
    ],
)
async def test_fetch_unknown(
    make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str, status: int, body: bytes
) -> None:
    sim = await make_sim(flavor)
    reply = await call(session, sim, "/mj/task/1748339029401828/fetch")
    assert (reply.status, reply.body) == (status, body)


async def test_queue(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    first = sim.add_task()
    sim.tick(2)
    second = sim.add_task()
    sim.add_task(outcome="modal")
    finished = sim.add_task(steps=0)
    sim.tick(2)
    sim.seed_tasks(5)
    queue = (await call(session, sim, "/mj/task/queue")).json()
    assert [t["id"] for t in queue] == [first, second]
    assert finished not in {t["id"] for t in queue}


@pytest.mark.parametrize("flavor", ["trueai", "new-api"])
async def test_routes_other_flavours_lack(
    make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str
) -> None:
    sim = await make_sim(flavor)
    task_id = sim.add_task()
    queue = await call(session, sim, "/mj/task/queue")
    query = await call(session, sim, "/mj/task/query", method="POST", body={})
    if flavor == "trueai":
        assert (queue.status, query.status) == (404, 404)
        return
    for path, method in (
        ("/mj/task/list", "GET"),
        ("/mj/task/queue", "GET"),
        ("/mj/task/query", "POST"),
        (f"/mj/task/{task_id}/cancel", "POST"),
    ):
        # new-api does not relay these: its web UI answers, whatever the key.
        reply = await call(session, sim, path, method=method, headers={})
        assert (reply.status, reply.content_type) == (200, "text/html")
        assert b"<title>New API</title>" in reply.body
    assert (sim.task(task_id) or {})["status"] == ""


async def test_query_pages(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim("plus")
    sim.seed_tasks(30)
    running = [sim.add_task() for _ in range(3)]
    sim.tick()
    body = {"pageNumber": 1, "pageSize": 10, "sort": "id,desc"}
    page = (await call(session, sim, "/mj/task/query", method="POST", body=body)).json()
    assert list(page) == [
        "content",
        "pageable",
        "last",
        "totalElements",
        "totalPages",
        "size",
        "number",
        "sort",
        "first",
        "numberOfElements",
        "empty",
    ]
    assert (page["totalElements"], page["totalPages"], page["number"]) == (33, 4, 1)
    assert (page["first"], page["last"], page["numberOfElements"]) == (False, False, 10)
    assert page["pageable"]["offset"] == 10
    ids = [t["id"] for t in page["content"]]
    assert ids == sorted(ids, reverse=True)
    body = {"pageNumber": 0, "statusSet": ["SUBMITTED", "IN_PROGRESS"]}
    queued = (await call(session, sim, "/mj/task/query", method="POST", body=body)).json()
    assert sorted(t["id"] for t in queued["content"]) == sorted(running)
    assert queued["size"] == 10
    body = {"pageNumber": 9, "pageSize": 10}
    past = (await call(session, sim, "/mj/task/query", method="POST", body=body)).json()
    assert (past["empty"], past["content"]) == (True, [])


async def test_cancel_midjourney_proxy(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    task_id = sim.add_task()
    sim.tick(2)
    first = await call(session, sim, f"/mj/task/{task_id}/cancel", method="POST")
    assert first.json() == {"code": 1, "description": "成功"}
    assert (sim.task(task_id) or {})["status"] == "CANCEL"
    again = await call(session, sim, f"/mj/task/{task_id}/cancel", method="POST")
    assert again.json()["code"] == 4
    unknown = await call(session, sim, "/mj/task/1/cancel", method="POST")
    assert unknown.json()["code"] == 3


async def test_cancel_trueai_fails_the_task(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("trueai")
    task_id = sim.add_task()
    reply = await call(session, sim, f"/mj/task/{task_id}/cancel", method="POST")
    assert (reply.status, reply.body) == (200, b"")
    task = sim.task(task_id) or {}
    assert (task["status"], task["failReason"]) == ("FAILURE", "取消任务")
    assert sim.cancel(task_id) is False


@pytest.mark.parametrize("flavor", [f for f in FLAVORS if f != "nz"])  # nz: no image-seed
async def test_image_seed(make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str) -> None:
    sim = await make_sim(flavor)
    done = sim.add_task(steps=0)
    sim.tick(2)
    running = sim.add_task()
    seed = (await call(session, sim, f"/mj/task/{done}/image-seed")).json()
    assert (seed["code"], seed["description"]) == (1, "成功")
    assert seed["result"].isdigit()
    early = await call(session, sim, f"/mj/task/{running}/image-seed")
    unknown = await call(session, sim, "/mj/task/9/image-seed")
    match flavor:
        case "trueai":
            assert (early.status, early.json()["code"]) == (400, 4)
            assert (unknown.status, unknown.json()["code"]) == (404, 3)
        case "new-api":
            assert (unknown.status, unknown.json()["description"]) == (400, "task_no_found")
        case _:
            assert (early.status, early.json()["code"]) == (200, 4)
            assert unknown.json()["code"] == 3


# submits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_submit_imagine(
    make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str
) -> None:
    sim = await make_sim(flavor)
    body = {"prompt": "a fox --ar 16:9", "state": "order-42", "notifyHook": "http://127.0.0.1:1/h"}
    reply = (await call(session, sim, "/mj/submit/imagine", method="POST", body=body)).json()
    assert (reply["code"], reply["description"]) == (1, "Submit success")
    assert reply["properties"]["discordInstanceId"]
    task = sim.task(reply["result"]) or {}
    assert (task["prompt"], task["state"]) == ("a fox --ar 16:9", "order-42")
    if flavor in ("midjourney-proxy", "nz"):
        assert task["properties"]["notifyHook"] == "http://127.0.0.1:1/h"

    banned = await call(session, sim, "/mj/submit/imagine", method="POST", body={"prompt": "nsfw"})
    assert banned.json()["code"] == 24
    assert banned.json()["properties"]["bannedWord"] == "nsfw"
    empty = await call(session, sim, "/mj/submit/imagine", method="POST", body={"prompt": " "})
    assert empty.json()["code"] == 4
    modal = await call(
        session, sim, "/mj/submit/imagine", method="POST", body={"prompt": "cat --remix modal"}
    )
    if flavor == "nz":  # no remix window in nz: the task simply queues
        assert modal.json()["code"] == 1
        assert (sim.task(modal.json()["result"]) or {})["status"] == "NOT_START"
    else:
        assert modal.json()["code"] == (1 if flavor == "new-api" else 21)
        assert (sim.task(modal.json()["result"]) or {})["status"] == "MODAL"
    assert len(sim.task(reply["result"]) or {}) > 0
    assert ("POST", "/mj/submit/imagine") in sim.requests


async def test_submit_follow_ups(make_sim: MakeSim, session: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    parent = sim.add_task(steps=0)
    early = await call(
        session,
        sim,
        "/mj/submit/change",
        method="POST",
        body={"taskId": parent, "action": "UPSCALE"},
    )
    assert early.json()["code"] == 4
    sim.tick(2)
    custom_id = (sim.task(parent) or {})["buttons"][0]["customId"]
    action = await call(
        session,
        sim,
        "/mj/submit/action",
        method="POST",
        body={"taskId": parent, "customId": custom_id},
    )
    upscale = sim.task(action.json()["result"]) or {}
    assert upscale["action"] == "UPSCALE"
    sim.tick(10)
    assert any(
        "upsample_v6_2x" in b["customId"] for b in (sim.task(upscale["id"]) or {})["buttons"]
    )
    simple = await call(
        session, sim, "/mj/submit/simple-change", method="POST", body={"content": f"{parent} V2"}
    )
    assert (sim.task(simple.json()["result"]) or {})["action"] == "VARIATION"
    zoom = await call(
        session,
        sim,
        "/mj/submit/action",
        method="POST",
        body={"taskId": parent, "customId": f"MJ::CustomZoom::{parent}"},
    )
    assert zoom.json()["code"] == 21
    blend = await call(session, sim, "/mj/submit/blend", method="POST", body={"base64Array": ["a"]})
    assert blend.json()["code"] == 4
    describe = await call(session, sim, "/mj/submit/describe", method="POST", body={"base64": "x"})
    assert (sim.task(describe.json()["result"]) or {})["action"] == "DESCRIBE"
    gone = await call(
        session, sim, "/mj/submit/action", method="POST", body={"taskId": "1", "customId": "x"}
    )
    assert gone.json()["code"] == 3


# nz: the open-source midjourney-proxy 2.x -------------------------------------------------------


def test_plus_is_midjourney_proxy_and_nz_is_its_own_flavour() -> None:
    assert Simulator("plus", api_key=None).flavor == "midjourney-proxy"
    assert Simulator("nz", api_key=None).flavor == "nz"


async def test_nz_task_shape_has_no_buttons(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("nz")
    task_id = sim.add_task("dog playing ball", steps=2)
    seen = []
    for _ in range(5):
        seen.append((await call(session, sim, f"/mj/task/{task_id}/fetch")).json())
        sim.tick()
    assert [t["status"] for t in seen] == [
        "NOT_START",
        "SUBMITTED",
        "IN_PROGRESS",
        "IN_PROGRESS",
        "SUCCESS",
    ]
    nz_keys = [k for k in NZ_KEYS if k != "buttons"]
    assert all(list(t) == nz_keys for t in seen)
    assert seen[-1]["progress"] == "100%"
    assert seen[-1]["properties"]["finalPrompt"] == "dog playing ball --v 7.0"
    listed = (await call(session, sim, "/mj/task/list")).json()
    assert listed == [seen[-1]]


async def test_nz_lacks_query_cancel_and_image_seed(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("nz")
    task_id = sim.add_task()
    sim.tick(2)
    for method, path, body in (
        ("POST", "/mj/task/query", {"pageNumber": 0, "pageSize": 10}),
        ("POST", f"/mj/task/{task_id}/cancel", None),
        ("GET", f"/mj/task/{task_id}/image-seed", None),
        ("POST", "/mj/submit/modal", {"taskId": task_id}),
        ("POST", "/mj/submit/action", {"taskId": task_id, "customId": "MJ::JOB::upsample::1"}),
    ):
        reply = await call(session, sim, path, method=method, body=body)
        assert (reply.status, reply.content_type) == (404, "application/json"), path
        error = reply.json()
        assert list(error) == ["timestamp", "status", "error", "path"]
        assert (error["status"], error["error"], error["path"]) == (404, "Not Found", path)
    assert (sim.task(task_id) or {})["status"] == "IN_PROGRESS"  # the cancel did nothing
    assert sim.cancel(task_id) is False


async def test_nz_serves_an_uncapped_list_the_queue_and_fetch(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("nz")
    sim.seed_tasks(150)
    first = sim.add_task()
    second = sim.add_task()
    sim.tick()
    late = sim.add_task()
    listed = (await call(session, sim, "/mj/task/list")).json()
    assert len(listed) == 153
    assert [t["id"] for t in listed[:3]] == [late, second, first]
    queue = (await call(session, sim, "/mj/task/queue")).json()
    assert [(t["id"], t["status"]) for t in queue] == [
        (first, "SUBMITTED"),
        (second, "SUBMITTED"),
        (late, "NOT_START"),
    ]
    fetched = (await call(session, sim, f"/mj/task/{late}/fetch")).json()
    assert fetched == sim.task(late)
    unknown = await call(session, sim, "/mj/task/1748339029401828/fetch")
    assert (unknown.status, unknown.body) == (200, b"")


def test_nz_has_no_modal_or_cancel_outcome() -> None:
    sim = Simulator("nz", api_key=None, seed=3)
    for outcome in ("modal", "cancel"):
        with pytest.raises(ValueError, match=outcome.upper()):
            sim.add_task(outcome=outcome)
    sim.seed_tasks(60, finished=False)
    sim.tick(40)
    statuses = {t["status"] for t in (sim.task(i) or {} for i in list(sim._tasks))}
    assert statuses <= {"SUCCESS", "FAILURE"}
    assert "SUCCESS" in statuses


async def test_nz_submits_without_modal_or_cancel(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim("nz")
    ids = []
    for prompt in ("cat --remix modal", "please cancel this"):
        reply = await call(
            session, sim, "/mj/submit/imagine", method="POST", body={"prompt": prompt}
        )
        assert reply.json()["code"] == 1
        ids.append(reply.json()["result"])
    sim.tick(10)
    assert [(sim.task(i) or {})["status"] for i in ids] == ["SUCCESS", "SUCCESS"]
    upscale = await call(
        session,
        sim,
        "/mj/submit/change",
        method="POST",
        body={"taskId": ids[0], "action": "UPSCALE", "index": 1},
    )
    assert upscale.json()["code"] == 1
    assert (sim.task(upscale.json()["result"]) or {})["action"] == "UPSCALE"


# notifyHook ---------------------------------------------------------------------------------------


Receiver = tuple[str, list[dict[str, Any]], asyncio.Queue[dict[str, Any]]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A local notifyHook endpoint: (url, every body received, a queue of the same bodies)."""
    received: list[dict[str, Any]] = []
    arrivals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        body = await request.json()
        received.append(body)
        arrivals.put_nowait(body)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received, arrivals
    await runner.cleanup()


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_notify_hook_posts_every_change(
    make_sim: MakeSim, receiver: Receiver, flavor: str
) -> None:
    url, received, _ = receiver
    sim = await make_sim(flavor)
    task_id = sim.add_task(steps=2, notify_hook=url)
    sim.tick(10)
    await asyncio.wait_for(sim.flush(), 5)
    if flavor == "new-api":
        assert received == []  # new-api strips notifyHook
        return
    assert [t["status"] for t in received] == ["SUBMITTED", "IN_PROGRESS", "IN_PROGRESS", "SUCCESS"]
    assert received[-1] == sim.task(task_id)
    assert received[0]["properties"]["notifyHook"] == url


async def test_global_notify_hook_and_dead_hooks(make_sim: MakeSim, receiver: Receiver) -> None:
    url, received, _ = receiver
    sim = await make_sim(notify_hook=url)
    sim.add_task(outcome="banned")
    dead = sim.add_task(outcome="banned", notify_hook="http://127.0.0.1:9/nothing-listens")
    sim.tick(3)
    await asyncio.wait_for(sim.flush(), 5)
    assert [t["status"] for t in received] == ["SUBMITTED", "FAILURE"]
    assert [(i, c) for i, _, c in sim.notifications if i == dead] == [(dead, -1), (dead, -1)]


# faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "timeout"])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_faults(
    make_sim: MakeSim, session: aiohttp.ClientSession, flavor: str, fault: str
) -> None:
    sim = await make_sim(flavor)
    task_id = sim.add_task()
    sim.fault = fault
    reply = await call(
        session, sim, "/mj/task/list-by-condition", method="POST", body={"ids": [task_id]}
    )
    match fault:
        case "500" | "502" | "401" | "403" | "429":
            assert reply.status == int(fault)
        case "html":
            assert (reply.status, reply.content_type) == (200, "text/html")
            assert reply.body.lstrip().lower().startswith(b"<!doctype html>")
        case "truncated" | "malformed":
            assert (reply.status, reply.content_type) == (200, "application/json")
            with pytest.raises(json.JSONDecodeError):
                reply.json()
        case "wrong_shape":
            data = reply.json()
            assert isinstance(data, dict)
            assert data["code"] == 0
        case "empty":
            assert (reply.status, reply.body) == (200, b"")
    # Only /mj/task/* misbehaves; the fault lifts when cleared.
    submit = await call(session, sim, "/mj/submit/imagine", method="POST", body={"prompt": "x"})
    assert submit.json()["code"] == 1
    sim.fault = None
    assert (await call(session, sim, f"/mj/task/{task_id}/fetch")).json()["id"] == task_id


async def test_timeout_fault_hangs_and_stop_does_not_wait(session: aiohttp.ClientSession) -> None:
    sim = Simulator()
    await sim.start()
    sim.fault = "timeout"
    with pytest.raises(TimeoutError):
        async with session.get(
            sim.url + "/mj/task/list",
            headers=HEADERS["midjourney-proxy"],
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    pending = asyncio.ensure_future(call(session, sim, "/mj/task/list"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(sim.stop(), 5)
    with contextlib.suppress(aiohttp.ClientError):
        await asyncio.wait_for(pending, 5)


async def test_timeout_fault_answers_after_hang(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.hang_seconds = 0.05
    sim.fault = "timeout"
    assert (await call(session, sim, "/mj/task/list")).json() == []


# misc ---------------------------------------------------------------------------------------------


def test_seed_makes_runs_repeatable() -> None:
    def run(seed: int) -> list[str]:
        sim = Simulator(seed=seed)
        task_id = sim.add_task(steps=4)
        progress = []
        for _ in range(6):
            sim.tick()
            progress.append((sim.task(task_id) or {})["progress"])
        return progress

    assert run(7) == run(7)
    assert run(7) != run(8)


async def test_unfinished_seeded_tasks_run_to_the_end(
    make_sim: MakeSim, session: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.seed_tasks(50, finished=False)
    before = (await call(session, sim, "/mj/task/list")).json()
    assert {t["status"] for t in before} == {"NOT_START"}
    sim.tick(20)
    after = (await call(session, sim, "/mj/task/list")).json()
    assert {t["status"] for t in after} <= {"SUCCESS", "FAILURE", "CANCEL"}
    assert [t["id"] for t in after] == [t["id"] for t in before]


async def test_restart_on_the_same_port_keeps_tasks(session: aiohttp.ClientSession) -> None:
    sim = Simulator(api_key=None)
    url = await sim.start()
    task_id = sim.add_task()
    await sim.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(session, sim, "/mj/task/list", headers={})
    assert await sim.start(port=int(url.rsplit(":", 1)[1])) == url
    try:
        tasks = (await call(session, sim, "/mj/task/list", headers={})).json()
        assert [t["id"] for t in tasks] == [task_id]
    finally:
        await sim.stop()


def test_unknown_flavor_is_refused() -> None:
    with pytest.raises(ValueError, match="flavor"):
        Simulator("openai")


async def test_auto_tick(receiver: Receiver) -> None:
    url, _, arrivals = receiver
    sim = Simulator(notify_hook=url)
    await sim.start(tick_interval=0.01)
    try:
        task_id = sim.add_task(steps=1)
        async with asyncio.timeout(5):
            statuses = [(await arrivals.get())["status"] for _ in range(3)]
        assert statuses == ["SUBMITTED", "IN_PROGRESS", "SUCCESS"]
        assert (sim.task(task_id) or {})["status"] == "SUCCESS"
    finally:
        await sim.stop()


async def test_serve_prints_url_and_serves(
    capsys: pytest.CaptureFixture[str], session: aiohttp.ClientSession
) -> None:
    running = asyncio.create_task(serve(0, "trueai", 3, KEY))
    try:
        async with asyncio.timeout(5):
            out = ""
            while "listening on" not in out:
                await asyncio.sleep(0.01)
                out += capsys.readouterr().out
        assert "Authorization: sim-key" in out
        match = re.search(r"listening on (\S+)", out)
        assert match is not None
        async with session.get(match.group(1) + "/mj/task/list", headers=HEADERS["trueai"]) as resp:
            assert len(await resp.json()) == 4
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


@pytest.mark.parametrize("flavor", ["midjourney-proxy", "nz", "trueai", "new-api"])
async def test_the_banner_curl_answers_task_json(
    capsys: pytest.CaptureFixture[str], session: aiohttp.ClientSession, flavor: str
) -> None:
    """The command the banner suggests works as printed on every flavour (new-api answers its
    web page at /mj/task/list, so it suggests fetching a task by id)."""
    running = asyncio.create_task(serve(0, flavor, 3, KEY))
    try:
        async with asyncio.timeout(10):
            out = ""
            while "try: curl" not in out:
                await asyncio.sleep(0.01)
                out += capsys.readouterr().out
        match = re.search(r"try: curl -H '([^:]+): ([^']+)' (\S+)", out)
        assert match is not None, out
        headers = {match[1]: match[2]}
        async with session.get(match[3], headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
        assert body["id"] if isinstance(body, dict) else len(body) >= 3
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

"""The submit pass-through, POST /track and `bridge track`: a client that changes only its base
URL gets its tasks followed on a relay without a task list (new-api), and on midjourney-proxy the
upstream pushes to the bridge's own hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bridge.app import Bridge
from bridge.commands.track import track_command
from bridge.config import Config
from bridge.models import Event
from bridge.server.passthrough import SOURCE_HEADER
from bridge.simulator import Simulator
from bridge.store import Store

AUTH = {"midjourney-proxy": "mj-api-secret", "trueai": "raw", "new-api": "bearer"}
CLIENT_AUTH = {
    "midjourney-proxy": {"mj-api-secret": "k"},
    "new-api": {"Authorization": "Bearer k"},
}


def make_config(sims: dict[str, Simulator], **source: Any) -> Config:
    return Config.model_validate(
        {
            "sources": [
                {
                    "name": name,
                    "base_url": sim.url,
                    "api_key": "k",
                    "auth": AUTH[sim.flavor],
                    "poll_interval": "50ms",
                    **source,
                }
                for name, sim in sims.items()
            ],
            "server": {"listen": "127.0.0.1:0"},
        }
    )


@asynccontextmanager
async def bridge_with_server(
    config: Config, db: Path
) -> AsyncIterator[tuple[Bridge, str, list[Event]]]:
    """The bridge running, with its server (hooks and pass-through) on a free port."""
    events: list[Event] = []
    bridge = Bridge(config, str(db), on_event=[events.append])
    task = asyncio.create_task(bridge.run())
    await bridge.wait_started()
    assert bridge.url is not None
    try:
        yield bridge, bridge.url, events
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15)


def got(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.subject, e.type) for e in events]


async def until(predicate: Any, sim: Simulator, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            sim.tick()
            await asyncio.sleep(0.05)


async def test_new_api_submit_through_the_bridge_is_followed(tmp_path: Path) -> None:
    async with (
        Simulator("new-api", api_key="k") as sim,
        bridge_with_server(make_config({"relay": sim}), tmp_path / "b.db") as (bridge, url, events),
        aiohttp.ClientSession() as client,
    ):
        # A caller without the source's key is refused by the bridge itself.
        async with client.post(
            url + "/mj/submit/imagine", json={"prompt": "x"}, headers={"Authorization": "Bad"}
        ) as resp:
            assert resp.status == 401
        async with client.post(
            url + "/mj/submit/imagine",
            json={"prompt": "a relay fox"},
            headers=CLIENT_AUTH["new-api"],
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["code"] == 1
        tid = answer["result"]
        await until(lambda: (tid, "task.succeeded") in got(events), sim)
        types = [t for s, t in got(events) if s == tid]
        assert types[0] == "task.submitted"
        assert bridge.running is not None
        assert bridge.running.watchers["relay"].status.mode == "ids"
        # The client's polling through the bridge works too (base URL is all it changed).
        async with client.get(
            url + f"/mj/task/{tid}/fetch", headers=CLIENT_AUTH["new-api"]
        ) as resp:
            assert (await resp.json())["status"] == "SUCCESS"


async def test_midjourney_proxy_pushes_to_the_bridge_hook(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim:
        config = make_config({"mj": sim}, push_token="tok-123", poll_interval="1h")
        async with (
            bridge_with_server(config, tmp_path / "b.db") as (_bridge, url, events),
            aiohttp.ClientSession() as client,
        ):
            async with client.post(
                url + "/mj/submit/imagine",
                json={"prompt": "a pushed fox"},
                headers=CLIENT_AUTH["midjourney-proxy"],
            ) as resp:
                tid = (await resp.json())["result"]
            task = sim.task(tid)
            assert task is not None
            # A hook for this one task: never the source's push_token.
            hook = task["properties"]["notifyHook"]
            assert hook.startswith(f"{url}/hooks/mj?task=")
            assert "tok-123" not in hook
            # Polls are an hour apart: only the pushes can bring these.
            await until(lambda: (tid, "task.succeeded") in got(events), sim)
            assert all(code == 200 for _, _, code in sim.notifications)
            done = next(e for e in events if e.type == "task.succeeded")
            assert "tok-123" not in str(done.task)


async def test_a_callers_own_notify_hook_is_kept(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="k") as sim:
        config = make_config({"mj": sim}, push_token="tok", poll_interval="1h")
        async with (
            bridge_with_server(config, tmp_path / "b.db") as (_, url, _events),
            aiohttp.ClientSession() as client,
        ):
            hook = "http://127.0.0.1:9/mine"
            async with client.post(
                url + "/mj/submit/imagine",
                json={"prompt": "mine", "notifyHook": hook},
                headers=CLIENT_AUTH["midjourney-proxy"],
            ) as resp:
                tid = (await resp.json())["result"]
            task = sim.task(tid)
            assert task is not None
            assert task["properties"]["notifyHook"] == hook


async def test_several_sources_are_told_apart_by_prefix_or_header(tmp_path: Path) -> None:
    async with (
        Simulator("new-api", api_key="k") as a,
        Simulator("new-api", api_key="k") as b,
    ):
        config = make_config({"a": a, "b": b})
        async with (
            bridge_with_server(config, tmp_path / "b.db") as (bridge, url, _events),
            aiohttp.ClientSession() as client,
        ):
            body = {"prompt": "where"}
            headers = CLIENT_AUTH["new-api"]
            async with client.post(url + "/mj/submit/imagine", json=body, headers=headers) as r:
                assert r.status == 400
                assert "several sources" in (await r.json())["error"]
            async with client.post(url + "/b/mj/submit/imagine", json=body, headers=headers) as r:
                tid_b = (await r.json())["result"]
            with_header = {**headers, SOURCE_HEADER: "a"}
            async with client.post(url + "/mj/submit/imagine", json=body, headers=with_header) as r:
                tid_a = (await r.json())["result"]
            assert a.task(tid_a) is not None
            assert a.task(tid_b) is None
            assert b.task(tid_b) is not None
            assert bridge.running is not None
            assert tid_a in bridge.running.watchers["a"].states
            assert tid_b in bridge.running.watchers["b"].states


async def test_track_endpoint(tmp_path: Path) -> None:
    async with Simulator("new-api", api_key="k") as sim:
        config = make_config({"relay": sim}, push_token="tok")
        tid = sim.add_task("tracked by hand", outcome="failure", steps=2)
        async with (
            bridge_with_server(config, tmp_path / "b.db") as (_bridge, url, events),
            aiohttp.ClientSession() as client,
        ):
            async with client.post(url + "/track/relay", json={"ids": [tid]}) as r:
                assert r.status == 401
            async with client.post(url + "/track/nope?token=tok", json={"ids": [tid]}) as r:
                assert r.status == 404
            async with client.post(url + "/track/relay?token=tok", json={"id": tid}) as r:
                assert r.status == 400
            bearer = {"Authorization": "Bearer tok"}
            async with client.post(url + "/track/relay", json={"ids": [tid]}, headers=bearer) as r:
                assert await r.json() == {"tracked": 1, "known": 0, "ids": [tid]}
            await until(lambda: (tid, "task.failed") in got(events), sim)
            assert next(t for s, t in got(events) if s == tid) == "task.submitted"


async def test_track_is_off_without_a_push_token(tmp_path: Path) -> None:
    async with (
        Simulator("new-api", api_key="k") as sim,
        bridge_with_server(make_config({"relay": sim}), tmp_path / "b.db") as (_, url, _events),
        aiohttp.ClientSession() as client,
        client.post(url + "/track/relay?token=", json={"ids": ["1"]}) as r,
    ):
        assert r.status == 404


async def test_bridge_track_command_stores_ids_for_the_next_start(
    tmp_path: Path, capsys: Any
) -> None:
    async with Simulator("new-api", api_key="k") as sim:
        config = make_config({"relay": sim})
        db = tmp_path / "b.db"
        tid = sim.add_task("tracked from the shell", outcome="success", steps=1)
        assert await track_command(config, str(db), "nope", [tid]) == 2
        assert await track_command(config, str(db), "relay", [tid, " "]) == 0
        assert "1 new task id(s) stored" in capsys.readouterr().out
        assert await track_command(config, str(db), "relay", [tid]) == 0
        assert (
            capsys.readouterr().out
            == "relay: already followed (1 task id(s) known); nothing stored\n"
        )
        store = await Store.open(str(db))
        try:
            assert tid in await store.load_tasks("relay")
        finally:
            await store.close()
        async with bridge_with_server(config, db) as (_, _url, events):
            await until(lambda: (tid, "task.succeeded") in got(events), sim)
            assert got(events)[0] == (tid, "task.submitted")

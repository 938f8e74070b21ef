"""The operator surfaces as a stranger on the network meets them, against a real listening bridge:
server.auth (a bearer token, users with hashed passwords, sessions with their own CSRF tokens),
the Host allow-list against DNS rebinding, and the log naming every address bound."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.config import Config, ServerConfig, hash_password
from bridge.simulator import Simulator
from tests.conftest_browser import (
    PUSH_TOKEN,
    SIM_KEY,
    Harness,
    eventually,
    make_config,
    running_bridge,
)
from tests.receiver import Receiver, Reply

TOKEN = "operator-token-0123456789"
PASSWORD = "correct horse battery"


def with_server(config: Config, **server: Any) -> Config:
    return config.model_copy(
        update={"server": ServerConfig.model_validate({"listen": "127.0.0.1:0", **server})}
    )


@pytest.fixture
async def guarded(rx: Receiver, tmp_path: Path) -> AsyncIterator[Harness]:
    """A bridge whose operator surfaces need the token or ann's password; one dead letter."""
    auth = {"token": TOKEN, "users": {"ann": hash_password(PASSWORD)}, "metrics": True}
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = with_server(make_config(sim.url, rx.url), auth=auth)
        async with running_bridge(config, tmp_path / "b.db") as harness:
            rx.respond(Reply(400), path="/hook")
            sim.add_task("a cat")
            await harness.running.watchers["mj"].poll_once()
            await eventually(lambda: harness.running.deliverer.counts[("hook", "dead")] >= 1)
            yield harness


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # aiohttp keeps no cookies of bare IPs otherwise


async def test_strangers_get_no_page_no_metrics_no_replay(guarded: Harness) -> None:
    url = guarded.url
    async with aiohttp.ClientSession() as stranger:
        async with stranger.get(url + "/", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/login?next=/"
            assert "a cat" not in await resp.text()
        async with stranger.get(url + "/metrics") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with stranger.post(url + "/dlq/replay", data={"all": "1"}) as resp:
            assert resp.status == 401
        async with stranger.get(url + "/", headers={"Authorization": "Bearer wrong"}) as resp:
            assert "a cat" not in await resp.text()
        # Health stays open for process managers and load balancers.
        for path in ("/healthz", "/readyz"):
            async with stranger.get(url + path) as resp:
                assert resp.status == 200, path
    assert len(await guarded.running.store.dead_letters()) == 1


async def test_the_token_opens_everything(guarded: Harness) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=bearer) as ops:
        async with ops.get(guarded.url + "/") as resp:
            assert resp.status == 200
            assert "a cat" in await resp.text()
        async with ops.get(guarded.url + "/metrics") as resp:
            assert resp.status == 200
            assert "bridge_events_total" in await resp.text()
        # A bearer caller is no browser riding on a cookie: no CSRF token needed.
        async with ops.post(
            guarded.url + "/dlq/replay", data={"all": "1"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
    assert await guarded.running.store.dead_letters() == []


async def login(session: aiohttp.ClientSession, url: str, **form: str) -> aiohttp.ClientResponse:
    async with session.post(url + "/login", data=form, allow_redirects=False) as resp:
        return resp


async def test_users_log_in_and_each_session_has_its_own_csrf_token(guarded: Harness) -> None:
    url = guarded.url
    async with (
        aiohttp.ClientSession(cookie_jar=jar()) as ann,
        aiohttp.ClientSession(cookie_jar=jar()) as other,
        aiohttp.ClientSession(cookie_jar=jar()) as guesser,
    ):
        failed = await login(guesser, url, user="ann", password="wrong", next="/")
        assert failed.status == 303
        assert failed.headers["Location"].startswith("/login?failed=1")
        assert len(guesser.cookie_jar) == 0
        unknown = await login(guesser, url, user="bob", password=PASSWORD)
        assert unknown.headers["Location"].startswith("/login?failed=1")
        # An open redirect is not offered: next= is a path on this server or nothing.
        ok = await login(ann, url, user="ann", password=PASSWORD, next="//evil.example/")
        assert (ok.status, ok.headers["Location"]) == (303, "/")
        cookie = ok.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        await login(other, url, token=TOKEN)
        tokens = []
        for session in (ann, other):
            async with session.get(url + "/") as resp:
                assert resp.status == 200
                found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
                assert found is not None
                tokens.append(found[1])
        assert tokens[0] != tokens[1]
        # Another session's token does not replay with ann's cookie.
        async with ann.post(
            url + "/dlq/replay", data={"all": "1", "csrf": tokens[1]}, allow_redirects=False
        ) as resp:
            assert resp.status == 403
        assert len(await guarded.running.store.dead_letters()) == 1
        async with ann.post(
            url + "/dlq/replay", data={"all": "1", "csrf": tokens[0]}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        assert await guarded.running.store.dead_letters() == []
        # Logging out ends the session on the server, not only in the browser.
        session_id = next(c.value for c in ann.cookie_jar if c.key == "bridge_session")
        async with ann.post(url + "/logout", data={"csrf": tokens[0]}) as resp:
            assert resp.status == 200  # the login form
        async with (
            aiohttp.ClientSession(cookies={"bridge_session": session_id}) as replayed,
            replayed.get(url + "/", allow_redirects=False) as resp,
        ):
            assert resp.status == 303


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("attacker.example", 421),  # a DNS-rebinding page calls the bridge by its own name
        ("attacker.example:{port}", 421),
        ("127.0.0.1:{port}", 303),
        ("localhost:{port}", 303),
        ("bridge.internal:{port}", 421),  # a name only once server.public_url says so (below)
    ],
    ids=["rebinding", "rebinding-with-port", "ip", "localhost", "unconfigured-name"],
)
async def test_host_names_are_checked(guarded: Harness, host: str, status: int) -> None:
    port = guarded.url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port)}
    async with aiohttp.ClientSession() as http:
        async with http.get(guarded.url + "/", headers=headers, allow_redirects=False) as resp:
            assert resp.status == status
        async with http.get(guarded.url + "/healthz", headers=headers) as resp:
            assert resp.status == 200  # probes answer whatever name they use


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_public_url_names_the_host(rx: Receiver, tmp_path: Path) -> None:
    port = free_port()
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = with_server(
            make_config(sim.url, rx.url),
            listen=f"127.0.0.1:{port}",
            public_url="https://bridge.internal:8443",
        )
        async with running_bridge(config, tmp_path / "b.db") as harness:
            assert harness.url == "https://bridge.internal:8443"  # what serve() yields
            async with aiohttp.ClientSession() as http:
                for host, status in (("bridge.internal:8443", 200), ("evil.example", 421)):
                    async with http.get(
                        f"http://127.0.0.1:{port}/", headers={"Host": host}
                    ) as resp:
                        assert resp.status == status, host


async def test_every_bound_address_is_logged_and_insecure_is_said(
    rx: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = with_server(make_config(sim.url, rx.url), listen=":0", insecure=True)
        async with running_bridge(config, tmp_path / "b.db") as harness:
            lines = [r.getMessage() for r in caplog.records if r.name == "bridge.server"]
            bound = [line for line in lines if line.startswith("listening on ")]
            assert bound, lines
            assert all(line.endswith("(every interface)") for line in bound)
            assert any("http://0.0.0.0:" in line for line in bound)
            assert any("server.insecure: anyone who reaches" in line for line in lines)
            # The tests' push token is 14 characters: guessable on a network, and said so.
            weak = [r.getMessage() for r in caplog.records if "push_token has" in r.getMessage()]
            assert len(weak) == 1
            assert weak[0].startswith("mj: push_token has 14 characters")
            assert PUSH_TOKEN not in weak[0]
            assert harness.url.startswith("http://127.0.0.1:")


def test_bridge_run_refuses_to_listen_beyond_loopback_without_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    rules = tmp_path / "rules.yaml"
    rules.write_text("server:\n  listen: ':8787'\n")
    assert main(["run", "-c", str(rules), "--db", str(tmp_path / "b.db")]) == 2
    err = capsys.readouterr().err
    assert f"{rules}:2:" in err
    assert "reaches beyond this machine" in err
    assert "server.auth" in err
    assert "insecure: true" in err

"""The status page in a real headless Chromium (Debian's package, driven by Python Playwright):
sources and events listed, untrusted prompts shown as text, a dead letter replayed with its
button and delivered, cross-site posts refused. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.simulator import Simulator
from tests.conftest_browser import PUSH_TOKEN, SIM_KEY, Harness, advance, eventually, make_config
from tests.conftest_browser import running_bridge as running
from tests.receiver import Receiver, Reply

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
PROMPT = '<script>alert("x")</script> a lighthouse & <b>storm</b>'

if not CHROMIUM.exists():
    pytest.skip(
        "/usr/bin/chromium is missing: `make browser` (apt-get install chromium) installs it",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    try:
        yield page
    finally:
        await context.close()
    assert dialogs == [], "a prompt's script ran in the page"


@pytest.fixture
async def bridge(rx: Receiver, tmp_path: Path) -> AsyncIterator[tuple[Harness, Simulator]]:
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = make_config(sim.url, rx.url)
        async with running(config, tmp_path / "b.db") as harness:
            yield harness, sim


async def push(harness: Harness, task: dict[str, Any] | None) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{harness.url}/hooks/mj", params={"token": PUSH_TOKEN}, data=orjson.dumps(task)
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_status_page_in_chromium(
    bridge: tuple[Harness, Simulator], rx: Receiver, page: Page
) -> None:
    harness, sim = bridge
    store = harness.running.store
    # The first delivery is refused for good (400): a dead letter at once. Later ones succeed.
    rx.respond(Reply(400, b"no thanks"), path="/hook")
    task_id = sim.add_task(PROMPT)
    await push(harness, sim.task(task_id))
    await rx.wait_for(1)
    await eventually(lambda: harness.running.deliverer.counts[("hook", "dead")] == 1)
    [dead] = await store.dead_letters()

    await page.goto(harness.url + "/")
    await expect(page).to_have_title("mj-bridge status")
    source = page.locator('#sources tr[data-source="mj"]')
    await expect(source).to_contain_text("up")
    await expect(source.locator(".badge")).to_have_text("up")
    event = page.locator("#events tbody tr").first
    await expect(event).to_contain_text("task.submitted")
    await expect(event).to_contain_text(task_id)
    # The prompt is shown as text: no element was made of it, no script ran.
    await expect(event.locator("td.prompt")).to_have_text(PROMPT)
    assert await page.locator("#events td.prompt b, body script").count() == 0
    row = page.locator(f'#dead tr[data-dead="{dead.id}"]')
    await expect(row).to_contain_text("hook")
    await expect(row).to_contain_text("400")
    await expect(page.locator('#targets tr[data-target="hook"]')).to_contain_text("webhook")
    assert rx.url not in await page.content()  # target URLs are never shown

    # A cross-site form, on another site (localhost vs 127.0.0.1) with the right token: refused.
    csrf = await page.locator('#dead input[name="csrf"]').first.get_attribute("value")
    assert csrf
    rx.files["/evil"] = (
        (
            f'<form method="post" action="{harness.url}/dlq/replay">'
            f'<input type="hidden" name="csrf" value="{csrf}">'
            '<input type="hidden" name="all" value="1"><button id="go">win</button></form>'
        ).encode(),
        "text/html",
    )
    evil = await page.context.new_page()
    await evil.goto(f"http://localhost:{rx.port}/evil")
    async with evil.expect_response(re.compile(r"/dlq/replay$")) as info:
        await evil.click("#go")
    assert (await info.value).status == 403
    await evil.close()
    assert [d.id for d in await store.dead_letters()] == [dead.id]

    # The replay button of the dead letter: it leaves the list and is delivered.
    await page.reload()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    await row.locator("button.replay").click()
    await expect(page.locator("#notice")).to_have_text("Replayed 1 dead letter.")
    await expect(page.locator(f'#dead tr[data-dead="{dead.id}"]')).to_have_count(0)
    [_, again] = await rx.wait_for(2, path="/hook")
    assert again.json()["id"] == dead.event.id
    for _ in range(500):  # the ack is written in the next batch
        if [r.state for r in await store.recent_deliveries()] == ["sent"]:
            break
        await asyncio.sleep(0.01)
    await page.goto(harness.url + "/")
    await expect(page.locator("#dead")).to_contain_text("No dead letters.")
    await expect(
        page.locator(f'#deliveries tr[data-delivery="{dead.id}"] .badge.d-sent')
    ).to_have_text("sent")
    await page.screenshot(path=str(ARTIFACTS / "status-page-replayed.png"), full_page=True)


@pytest.mark.parametrize(
    ("headers", "form", "cookie", "status"),
    [
        ({"Origin": "http://evil.example"}, "good", True, 403),
        ({"Origin": "null"}, "good", True, 403),
        ({"Sec-Fetch-Site": "cross-site"}, "good", True, 403),
        ({"Sec-Fetch-Site": "same-site"}, "good", True, 403),
        ({}, "bad", True, 403),
        ({}, "none", True, 403),
        ({}, "good", False, 403),
        ({"Origin": "SELF", "Sec-Fetch-Site": "same-origin"}, "good", True, 303),
        ({}, "good", True, 303),
    ],
    ids=[
        "foreign-origin",
        "null-origin",
        "cross-site",
        "same-site-other-port",
        "bad-token",
        "no-token",
        "no-cookie",
        "same-origin",
        "no-origin-good-token",
    ],
)
async def test_replay_refuses_cross_site_posts(
    bridge: tuple[Harness, Simulator],
    rx: Receiver,
    headers: dict[str, str],
    form: str,
    cookie: bool,
    status: int,
) -> None:
    harness, sim = bridge
    rx.respond(Reply(400), path="/hook")
    await push(harness, sim.task(sim.add_task("a cat")))
    await eventually(lambda: harness.running.deliverer.counts[("hook", "dead")] == 1)

    # unsafe=True: aiohttp's jar keeps no cookies of bare IP hosts otherwise.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as page, aiohttp.ClientSession() as stranger:
        async with page.get(harness.url + "/") as resp:
            assert resp.status == 200
            html = await resp.text()
            assert "SameSite=Strict" in resp.headers["Set-Cookie"]
        assert [c.key for c in jar] == ["bridge_session"]
        # The CSRF token is the session's own, not the cookie (which scripts cannot read).
        found = re.search(r'name="csrf" value="([^"]+)"', html)
        assert found is not None
        token = found[1]
        assert token != next(iter(jar)).value
        data = {"all": "1"}
        if form != "none":
            data["csrf"] = token if form == "good" else "x" * len(token)
        headers = {k: harness.url if v == "SELF" else v for k, v in headers.items()}
        http = page if cookie else stranger
        async with http.post(
            harness.url + "/dlq/replay", data=data, headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == status
            if status == 303:
                assert resp.headers["Location"] == "/?replayed=1"
    assert len(await harness.running.store.dead_letters()) == (1 if status == 403 else 0)


async def test_the_page_says_what_delay_a_large_queue_only_upstream_allows(
    rx: Receiver, tmp_path: Path, page: Page
) -> None:
    from bridge.sources.modes import SMALL_LIST

    async with Simulator(flavor="nz", api_key=SIM_KEY) as sim:
        sim.seed_tasks(SMALL_LIST + 1)
        async with running(make_config(sim.url, rx.url), tmp_path / "b.db") as harness:
            await page.goto(harness.url + "/")
            note = page.locator('#sources p[data-note="mj"]')
            await expect(note).to_contain_text("up to 60s (full_every) late")
            await expect(note).to_contain_text("mj.notify-hook: http://<bridge>:8787/hooks/mj")


@pytest.fixture
async def busy(
    rx: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Harness, Simulator, list[str]]]:
    """Twelve finished tasks; a target that is down (failing), one that refuses every success for
    good (twelve dead letters); a source with a wrong key; pages of 10 events and 5 dead letters."""
    from bridge.config import Config
    from bridge.server import page as status

    monkeypatch.setattr(status, "EVENTS_PAGE", 10)
    monkeypatch.setattr(status, "DEAD_PAGE", 5)
    async with (
        Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim,
        Receiver(Reply(410, b"gone for good")) as refusing,
    ):
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": sim.url,
                        "api_key": SIM_KEY,
                        "auth": "mj-api-secret",
                        "poll_interval": "100ms",
                    },
                    {
                        "name": "locked",
                        "base_url": sim.url,
                        "api_key": "wrong-key",
                        "auth": "mj-api-secret",
                        "poll_interval": "100ms",
                    },
                ],
                "targets": {
                    "hook": {"webhook": f"{rx.url}/hook"},
                    "archive": {"webhook": "http://127.0.0.1:9/archive"},
                    "audit": {"webhook": f"{refusing.url}/audit"},
                },
                "rules": [
                    {"name": "all", "on": ["task.*"], "to": ["hook"]},
                    {"name": "keep", "on": ["task.succeeded"], "to": ["archive", "audit"]},
                ],
                "server": {"listen": "127.0.0.1:0"},
            }
        )
        async with running(config, tmp_path / "b.db", polled=["mj"]) as harness:
            prompts = [f"lighthouse number {n} in a storm" for n in range(12)]
            for prompt in prompts:
                sim.add_task(prompt, steps=1)
            await advance(harness, sim, 4)
            counts = harness.running.deliverer.counts
            await eventually(lambda: counts[("audit", "dead")] == 12, 30)
            await eventually(lambda: not harness.running.targets["archive"].up, 30)
            yield harness, sim, prompts


async def _rows(page: Page, section: str) -> list[str]:
    return await page.locator(f"#{section} tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.event || r.dataset.dead)"
    )


async def test_the_page_puts_failures_first_shows_images_and_filters_and_pages(
    busy: tuple[Harness, Simulator, list[str]], page: Page
) -> None:
    harness, _, prompts = busy
    await page.goto(harness.url + "/")
    # A failing target comes first, with its last error and since when.
    sections = await page.locator("section").evaluate_all("s => s.map(e => e.id)")
    assert sections[0] == "failing", sections
    alarm = page.locator('#failing [data-failing="archive"]')
    await expect(alarm).to_contain_text("failing since 20")
    await expect(alarm).to_contain_text("127.0.0.1:9")
    await expect(alarm.locator(".error .at")).to_contain_text("UTC")
    await expect(page.locator('#failing [data-failing="hook"]')).to_have_count(0)
    # Every error has a time: the source with the wrong key, a target's, the deliveries'.
    locked = page.locator('#sources tr[data-source="locked"] td.error')
    await expect(locked).to_contain_text("auth")
    await expect(locked.locator(".at")).to_contain_text("UTC")
    await expect(page.locator('#targets tr[data-target="archive"] td.error .at')).to_contain_text(
        "UTC"
    )
    # Thumbnails of finished tasks, loaded from the upstream's CDN.
    thumbs = page.locator("#images img")
    await expect(thumbs).to_have_count(12)
    await expect(page.locator("#events td.thumb img").first).to_be_visible()
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#images img')].every(i => i.naturalWidth > 0)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-page-busy.png"), full_page=True)

    # Pages of 10 events, then older ones, never the same twice.
    first = await _rows(page, "events")
    assert len(first) == 10
    await page.click("#events-older")
    second = await _rows(page, "events")
    assert second
    assert not set(first) & set(second)
    await page.click("#events-newest")
    assert await _rows(page, "events") == first

    # Filters: by type, by text, by source.
    await page.select_option('#filters select[name="type"]', "task.succeeded")
    await page.click('#filters button[type="submit"]')
    types = await page.locator("#events tbody .badge.type").all_inner_texts()
    assert set(types) == {"task.succeeded"}
    assert len(types) == 10
    await page.fill('#filters input[name="q"]', "NUMBER 7 in")
    await page.click('#filters button[type="submit"]')
    await expect(page.locator("#events tbody tr")).to_have_count(1)
    await expect(page.locator("#events tbody tr td.prompt")).to_have_text(prompts[7])
    await page.goto(harness.url + "/?source=locked")
    types = await page.locator("#events tbody .badge.type").all_inner_texts()
    assert types == ["source.down"]
    await page.goto(harness.url + "/?source=locked&type=task.*")
    await expect(page.locator("#events")).to_contain_text("No events match.")

    # One click from an event to its JSON, with its deliveries.
    await page.goto(harness.url + "/?type=task.succeeded")
    event_id = await page.locator("#events tbody tr").first.get_attribute("data-event")
    await page.locator("#events tbody tr a.json").first.click()
    body = orjson.loads(await page.locator("body").inner_text())
    assert body["event"]["id"] == event_id
    states = {d["target"]: d["state"] for d in body["deliveries"]}
    assert states["hook"] == "sent"
    assert states["audit"] == "dead"
    assert states["archive"] in ("pending", "inflight")

    # Dead letters: pages of 5, newest first, each with when it died.
    await page.goto(harness.url + "/?target=audit")
    dead_first = await _rows(page, "dead")
    assert len(dead_first) == 5
    await expect(page.locator("#dead tbody tr").first.locator("td").first).to_contain_text("UTC")
    await page.click("#dead-older")
    dead_second = await _rows(page, "dead")
    assert len(dead_second) == 5
    assert not set(dead_first) & set(dead_second)


async def test_login_page_and_dns_rebinding_in_chromium(rx: Receiver, tmp_path: Path) -> None:
    """With server.auth: Chromium is sent to the login form, a wrong password stays there, the
    right one shows the page, logging out ends it. A page on a name that resolves to the bridge
    (DNS rebinding, simulated with Chromium's resolver rules) gets 421 and no data."""
    from bridge.config import ServerConfig, hash_password

    password = "correct horse battery"
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = make_config(sim.url, rx.url)
        server = ServerConfig.model_validate(
            {"listen": "127.0.0.1:0", "auth": {"users": {"ann": hash_password(password)}}}
        )
        config = config.model_copy(update={"server": server})
        async with running(config, tmp_path / "b.db") as harness, async_playwright() as p:
            await push(harness, sim.task(sim.add_task("a secret prompt")))
            port = harness.url.rsplit(":", 1)[1]
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[*ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"],
            )
            try:
                page = await browser.new_page()
                await page.goto(harness.url + "/")
                await expect(page).to_have_title("mj-bridge: log in")
                assert "a secret prompt" not in await page.content()
                await page.fill('input[name="user"]', "ann")
                await page.fill('input[name="password"]', "wrong")
                await page.click('button[type="submit"]')
                await expect(page.locator("#failed")).to_be_visible()
                await page.fill('input[name="user"]', "ann")
                await page.fill('input[name="password"]', password)
                await page.click('button[type="submit"]')
                await expect(page).to_have_title("mj-bridge status")
                await expect(page.locator("#events")).to_contain_text("a secret prompt")
                await page.screenshot(path=str(ARTIFACTS / "status-page-login.png"))

                # The same browser on a rebinding name: refused before any handler runs.
                answer = await page.goto(f"http://rebind.example:{port}/")
                assert answer is not None
                assert answer.status == 421
                assert "a secret prompt" not in await page.content()

                await page.goto(harness.url + "/")
                await page.click("#logout button")
                await expect(page).to_have_title("mj-bridge: log in")
                await page.goto(harness.url + "/")
                await expect(page).to_have_title("mj-bridge: log in")
            finally:
                await browser.close()

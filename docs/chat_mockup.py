"""Renders docs/chat.md's examples: runs the real Discord and Slack targets against the local API
stand-in (tests/chat_api.py), prints the exact payloads they sent, and screenshots an HTML mock of
the messages in headless Chromium (docs/images/chat-*.png).

    .venv/bin/python docs/chat_mockup.py
"""

from __future__ import annotations

import asyncio
import base64
import html
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import DiscordTargetConfig, SlackTargetConfig  # noqa: E402
from bridge.targets import DiscordTarget, SlackTarget  # noqa: E402
from tests.chat_api import SLACK_TOKEN, ChatAPI, outbox_item, task_event  # noqa: E402

IMAGES = ROOT / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "a lighthouse in a storm, oil painting --ar 16:9"


def grid_png(width: int = 448, height: int = 252) -> bytes:
    """A stand-in for a Midjourney grid: four gradient tiles."""
    hues = [(40, 70, 140), (200, 120, 40), (30, 110, 90), (120, 50, 120)]
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")
        for x in range(width):
            r, g, b = hues[(y * 2 // height) * 2 + x * 2 // width]
            shade = 0.45 + 0.55 * ((x % (width // 2)) + (y % (height // 2))) / (
                width / 2 + height / 2
            )
            row += bytes((min(255, int(r * shade * 1.6)), min(255, int(g * shade * 1.6)),
                          min(255, int(b * shade * 1.6))))  # fmt: skip
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))  # fmt: skip


async def capture() -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], bytes]:
    """The Discord embeds and Slack blocks of a task at 45% and when done."""
    png = grid_png()
    async with ChatAPI() as api, aiohttp.ClientSession() as session:
        url = api.add_image("grid.png", png)
        discord = DiscordTarget("art", DiscordTargetConfig(
            discord=api.discord_webhook, api_base=api.discord_base, min_edit_interval=0,
            attach_image=True, allow_private_images=True), session)  # fmt: skip
        slack = SlackTarget("team", SlackTargetConfig(
            slack="#mj", token=SLACK_TOKEN, api_base=api.slack_base, min_edit_interval=0,
            attach_image=True, allow_private_images=True), session)  # fmt: skip
        running = task_event(1748339029401828, "task.progress", "45%", prompt=PROMPT,
                             imageUrl=url)  # fmt: skip
        done = task_event(1748339029401828, "task.succeeded", "100%", prompt=PROMPT,
                          imageUrl=url, finishTime=1_764_337_483_000)  # fmt: skip
        for target in (discord, slack):
            for event in (running, done):
                await target.send(outbox_item(event, target.name))
        embeds = [c.payload["embeds"][0] for c in api.of("discord")]
        blocks = [c.payload["blocks"] for c in api.of("slack") if c.path.startswith("/slack/chat.")]
        print("## Discord: POST ?wait=true (45%), then PATCH (done, multipart)\n")
        for call in api.of("discord"):
            print(call.method, call.path.replace(api.discord_base, ""), call.query)
            print(orjson.dumps(call.payload, option=orjson.OPT_INDENT_2).decode(), "\n")
        print("## Slack: chat.postMessage (45%), then chat.update (done)\n")
        for call in api.of("slack"):
            if call.path.startswith("/slack/chat."):
                print(call.path.removeprefix("/slack/"))
                print(orjson.dumps(call.payload, option=orjson.OPT_INDENT_2).decode(), "\n")
    return embeds, blocks, png


def _discord_md(text: str) -> str:
    return html.escape(re.sub(r"\\(.)", r"\1", text))


def discord_html(embed: dict[str, Any], image: str) -> str:
    fields = "".join(
        f'<div class="field{" inline" if f.get("inline") else ""}"><div class="fname">'
        f"{html.escape(f['name'])}</div><div>{_discord_md(f['value'])}</div></div>"
        for f in embed.get("fields", [])
    )
    picture = f'<img class="image" src="{image}">' if "image" in embed else ""
    return f"""
    <div class="dmsg"><div class="avatar">mj</div><div>
      <div class="dname">mj-bridge <span class="bot">APP</span>
        <span class="when">Today at 13:44</span></div>
      <div class="embed" style="border-color:#{embed["color"]:06x}">
        <div class="etitle">{html.escape(embed["title"])}</div>
        <div class="edesc">{_discord_md(embed.get("description", ""))}</div>
        <div class="fields">{fields}</div>{picture}
        <div class="efoot">{html.escape(embed["footer"]["text"])} • Today at 13:44</div>
      </div></div></div>"""


def _mrkdwn(text: str) -> str:
    text = html.escape(html.unescape(text)).replace("\n", "<br>")
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*([^*]+)\*", r"<b>\1</b>", text)


def slack_html(blocks: list[dict[str, Any]], image: str) -> str:
    parts = []
    for block in blocks:
        kind = block["type"]
        if kind == "header":
            parts.append(f'<div class="sheader">{html.escape(block["text"]["text"])}</div>')
        elif kind == "section" and "fields" in block:
            cells = "".join(f"<div>{_mrkdwn(f['text'])}</div>" for f in block["fields"])
            parts.append(f'<div class="sfields">{cells}</div>')
        elif kind == "section":
            text = block["text"]
            body = (
                html.escape(text["text"]) if text["type"] == "plain_text" else _mrkdwn(text["text"])
            )
            parts.append(f'<div class="ssection">{body}</div>')
        elif kind == "image":
            parts.append(f'<img class="simage" src="{image}">')
        elif kind == "context":
            parts.append(f'<div class="scontext">{_mrkdwn(block["elements"][0]["text"])}</div>')
    return f"""
    <div class="smsg"><div class="savatar">mj</div><div>
      <div class="sname">mj-bridge <span class="sapp">APP</span> <span class="when">1:44 PM</span>
      <span class="edited">(edited)</span></div>{"".join(parts)}</div></div>"""


CSS = """
body { margin: 0; font: 15px/1.4 "DejaVu Sans", sans-serif; }
.label { font: 12px "DejaVu Sans Mono", monospace; opacity: .6; margin: 14px 0 4px 72px; }
.discord { background: #313338; color: #dbdee1; padding: 8px 16px 16px; width: 620px; }
.dmsg, .smsg { display: flex; gap: 14px; }
.avatar, .savatar { width: 40px; height: 40px; border-radius: 50%; background: #5865f2;
  color: #fff; display: flex; align-items: center; justify-content: center; flex: none; }
.savatar { border-radius: 6px; background: #1d9bd1; }
.dname { color: #f2f3f5; font-weight: 600; }
.bot { background: #5865f2; color: #fff; font-size: 10px; padding: 1px 4px; border-radius: 3px; }
.when { color: #949ba4; font-size: 12px; font-weight: 400; margin-left: 4px; }
.embed { background: #2b2d31; border-left: 4px solid; border-radius: 4px; padding: 10px 14px 12px;
  margin-top: 4px; max-width: 480px; }
.etitle { color: #f2f3f5; font-weight: 600; margin-bottom: 6px; }
.edesc { font-size: 14px; margin-bottom: 8px; }
.fields { display: flex; flex-wrap: wrap; gap: 8px 0; font-size: 14px; }
.field { flex: 0 0 100%; } .field.inline { flex: 0 0 33%; }
.fname { color: #f2f3f5; font-weight: 600; font-size: 13px; }
.image { max-width: 100%; border-radius: 4px; margin-top: 12px; display: block; }
.efoot { color: #949ba4; font-size: 12px; margin-top: 8px; }
.slack { background: #fff; color: #1d1c1d; padding: 8px 20px 16px; width: 620px; }
.sname { font-weight: 700; } .sapp { background: #e8e8e8; color: #616061; font-size: 10px;
  padding: 1px 3px; border-radius: 2px; } .edited { color: #616061; font-size: 12px; }
.sheader { font-size: 18px; font-weight: 700; margin: 6px 0; }
.ssection { margin: 6px 0; } .sfields { display: grid; grid-template-columns: 1fr 1fr; gap: 8px;
  margin: 8px 0; } .simage { max-width: 360px; border-radius: 8px; margin: 6px 0; display: block; }
.scontext { color: #616061; font-size: 12px; } code { font-size: 12px; background: #f4f4f4;
  border: 1px solid #ddd; border-radius: 3px; padding: 0 3px; color: #c01343; }
"""


async def screenshot(name: str, body: str) -> None:
    from playwright.async_api import async_playwright

    IMAGES.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 660, "height": 400}, device_scale_factor=1)
        await page.set_content(f"<style>{CSS}</style>{body}")
        await page.locator("body > div").screenshot(path=str(IMAGES / name))
        await browser.close()


async def main() -> None:
    embeds, blocks, png = await capture()
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    running, done = embeds
    await screenshot("chat-discord.png", '<div class="discord">'
                     '<div class="label">while running: the same message at 45%</div>'
                     + discord_html(running, image)
                     + '<div class="label">when done: edited in place, image uploaded</div>'
                     + discord_html(done, image) + "</div>")  # fmt: skip
    running_blocks, done_blocks = blocks
    await screenshot("chat-slack.png", '<div class="slack">'
                     '<div class="label">while running: the same message at 45%</div>'
                     + slack_html(running_blocks, image)
                     + '<div class="label">when done: chat.update, image from files.upload</div>'
                     + slack_html(done_blocks, image) + "</div>")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

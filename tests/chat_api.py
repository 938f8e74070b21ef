"""A real local server speaking the subset of Discord's and Slack's HTTP APIs the chat targets use,
for tests. Records every call; keeps the messages as the services would; answers rate limits and
errors when told to. Also serves images (for `attach_image`).

    Discord (api_base = api.url + "/discord"):
        POST  /webhooks/{id}/{token}?wait=true           JSON, or multipart payload_json + files[n]
        PATCH /webhooks/{id}/{token}/messages/{message}  the same bodies
    Slack (api_base = api.url + "/slack"), Authorization: Bearer <token>:
        POST /chat.postMessage, /chat.update     JSON
        POST /files.getUploadURLExternal         form: filename, length -> upload_url, file_id
        POST /upload/{file_id}                   the file's bytes (no token)
        POST /files.completeUploadExternal       form: files=[{"id", "title"}]

    async with ChatAPI() as api:
        api.discord_rate_limit(0.05)             # the next Discord call answers 429
        ...
        calls = await api.wait_for(3)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from tests.local import LocalServer

DISCORD_ID = "1100"
DISCORD_TOKEN = "hook-TOKEN_abc123"
SLACK_TOKEN = "xoxb-1234-5678-sEcReTbOtToKeN"
SLACK_CHANNELS = {"#mj": "C0MJ", "C0MJ": "C0MJ"}


@dataclass(frozen=True, slots=True)
class Call:
    """One request as it arrived. `payload` is the JSON body (Discord's payload_json when
    multipart); `form` the form fields; `files` the uploaded parts (name -> (filename, type,
    bytes))."""

    service: str  # discord | slack | upload
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    payload: Any
    form: dict[str, str]
    files: dict[str, tuple[str, str, bytes]]
    body: bytes
    at: float  # time.monotonic() on arrival


@dataclass(slots=True)
class Answer:
    """A scripted answer that replaces the normal one."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class ChatAPI(LocalServer):
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.discord_messages: dict[str, dict[str, Any]] = {}
        self.slack_messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.slack_files: dict[str, dict[str, Any]] = {}
        self.images: dict[str, tuple[bytes, str]] = {}
        self.image_gets = 0
        self._scripts: dict[str, deque[Answer]] = {"discord": deque(), "slack": deque()}
        self._ids = itertools.count(1_250_000_000_000_000_001)
        self._ts = itertools.count(1)
        self._changed = asyncio.Condition()

    # -- set-up -----------------------------------------------------------------------------

    @property
    def discord_base(self) -> str:
        return self.url + "/discord"

    @property
    def discord_webhook(self) -> str:
        """The webhook URL a user would paste (the token part is what matters)."""
        return f"https://discord.com/api/webhooks/{DISCORD_ID}/{DISCORD_TOKEN}"

    @property
    def slack_base(self) -> str:
        return self.url + "/slack"

    def add_image(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        self.images[name] = (data, content_type)
        return f"{self.url}/images/{name}"

    def script(self, service: str, *answers: Answer) -> None:
        """The next calls to `service` get these answers instead of the normal ones."""
        self._scripts[service].extend(answers)

    def discord_rate_limit(self, retry_after: float, times: int = 1) -> None:
        """Discord's 429: JSON retry_after (seconds, fractional) and the X-RateLimit headers."""
        headers = {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": "a06de0de7fd7ab0fbc4d2d7a8bd0e3a3",
            "X-RateLimit-Scope": "shared",
            "Retry-After": str(math.ceil(retry_after)),
        }
        body = {
            "message": "You are being rate limited.",
            "retry_after": retry_after,
            "global": False,
        }
        self.script("discord", *[Answer(429, body, headers) for _ in range(times)])

    def slack_rate_limit(self, retry_after: int, times: int = 1) -> None:
        """Slack's 429: Retry-After in whole seconds."""
        answer = Answer(
            429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)}
        )
        self.script("slack", *[answer for _ in range(times)])

    def slack_error(self, error: str) -> None:
        """Slack's usual refusal: HTTP 200 with ok false."""
        self.script("slack", Answer(200, {"ok": False, "error": error}))

    # -- reading what happened --------------------------------------------------------------

    def of(self, service: str) -> list[Call]:
        return [c for c in self.calls if c.service == service]

    async def wait_for(
        self, count: int, service: str | None = None, within: float = 10.0
    ) -> list[Call]:
        """The first `count` calls (to `service` if given), waiting for them to arrive."""

        def matching() -> list[Call]:
            return [c for c in self.calls if service is None or c.service == service]

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(matching()) >= count)
        return matching()

    # -- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/discord/webhooks/{id}/{token}", self._discord_post)
        app.router.add_patch("/discord/webhooks/{id}/{token}/messages/{mid}", self._discord_patch)
        app.router.add_post("/slack/{method}", self._slack)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/images/{name}", self._image)
        return app

    # -- recording --------------------------------------------------------------------------

    async def _record(self, service: str, request: web.Request) -> Call:
        body = b""
        payload: Any = None
        form: dict[str, str] = {}
        files: dict[str, tuple[str, str, bytes]] = {}
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                assert isinstance(part, BodyPartReader), "nested multipart"
                data = await part.read()
                name = part.name or ""
                if part.filename:
                    ctype = part.headers.get("Content-Type", "")
                    files[name] = (part.filename, ctype, bytes(data))
                else:
                    form[name] = bytes(data).decode()
            if "payload_json" in form:
                payload = orjson.loads(form["payload_json"])
        elif request.content_type == "application/x-www-form-urlencoded":
            body = await request.read()
            form = {k: str(v) for k, v in (await request.post()).items()}
        else:
            body = await request.read()
            if request.content_type == "application/json" and body:
                payload = orjson.loads(body)
        call = Call(
            service=service,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            payload=payload,
            form=form,
            files=files,
            body=body,
            at=time.monotonic(),
        )
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        return call

    def _scripted(self, service: str) -> web.Response | None:
        queue = self._scripts[service]
        if not queue:
            return None
        answer = queue.popleft()
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)

    # -- Discord ----------------------------------------------------------------------------

    def _discord_refusal(self, request: web.Request) -> web.Response | None:
        if request.match_info["id"] != DISCORD_ID:
            return web.json_response({"message": "Unknown Webhook", "code": 10015}, status=404)
        if request.match_info["token"] != DISCORD_TOKEN:
            return web.json_response(
                {"message": "Invalid Webhook Token", "code": 50027}, status=401
            )
        return None

    @staticmethod
    def _discord_attachments(call: Call, keep: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Attachments after this request: the ones listed (existing ids kept; new ones refer to
        the upload's files[n] by index), as Discord v10 does on edit."""
        out = []
        for listed in call.payload.get("attachments", []) if call.payload else []:
            index = listed.get("id")
            part = call.files.get(f"files[{index}]")
            if part is not None:
                filename, ctype, data = part
                out.append(
                    {
                        "id": f"att{index}",
                        "filename": filename,
                        "content_type": ctype,
                        "size": len(data),
                    }
                )
            else:
                out += [a for a in keep if a["id"] == index]
        return out

    async def _discord_post(self, request: web.Request) -> web.Response:
        call = await self._record("discord", request)
        refused = self._scripted("discord") or self._discord_refusal(request)
        if refused is not None:
            return refused
        message = {
            "id": str(next(self._ids)),
            "webhook_id": DISCORD_ID,
            "embeds": call.payload.get("embeds", []),
            "attachments": self._discord_attachments(call, []),
        }
        self.discord_messages[message["id"]] = message
        if request.query.get("wait") != "true":
            return web.Response(status=204)
        return web.json_response(message)

    async def _discord_patch(self, request: web.Request) -> web.Response:
        call = await self._record("discord", request)
        refused = self._scripted("discord") or self._discord_refusal(request)
        if refused is not None:
            return refused
        message = self.discord_messages.get(request.match_info["mid"])
        if message is None:
            return web.json_response({"message": "Unknown Message", "code": 10008}, status=404)
        if "embeds" in call.payload:
            message["embeds"] = call.payload["embeds"]
        if "attachments" in call.payload:
            message["attachments"] = self._discord_attachments(call, message["attachments"])
        return web.json_response(message)

    # -- Slack ------------------------------------------------------------------------------

    async def _slack(self, request: web.Request) -> web.Response:
        call = await self._record("slack", request)
        scripted = self._scripted("slack")
        if scripted is not None:
            return scripted
        if call.headers.get("authorization") != f"Bearer {SLACK_TOKEN}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        method = request.match_info["method"]
        handler = {
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "files.getUploadURLExternal": self._upload_url,
            "files.completeUploadExternal": self._complete_upload,
        }.get(method)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"}, status=404)
        return web.json_response(handler(call))

    def _post_message(self, call: Call) -> dict[str, Any]:
        channel = SLACK_CHANNELS.get(call.payload.get("channel", ""))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        ts = f"{1_760_000_000 + next(self._ts)}.000100"
        message = {"text": call.payload.get("text"), "blocks": call.payload.get("blocks"), "ts": ts}
        self.slack_messages[(channel, ts)] = message
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _update(self, call: Call) -> dict[str, Any]:
        key = (call.payload.get("channel", ""), call.payload.get("ts", ""))
        if key[0] not in SLACK_CHANNELS.values():
            return {"ok": False, "error": "channel_not_found"}
        message = self.slack_messages.get(key)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message.update(text=call.payload.get("text"), blocks=call.payload.get("blocks"))
        return {"ok": True, "channel": key[0], "ts": key[1], "text": message["text"]}

    def _upload_url(self, call: Call) -> dict[str, Any]:
        filename, length = call.form.get("filename"), call.form.get("length", "")
        if not filename or not length.isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"F{next(self._ts):08d}"
        self.slack_files[file_id] = {
            "name": filename,
            "length": int(length),
            "data": None,
            "complete": False,
        }
        return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}

    def _complete_upload(self, call: Call) -> dict[str, Any]:
        listed = orjson.loads(call.form.get("files", "[]"))
        done = []
        for entry in listed:
            file = self.slack_files.get(entry.get("id"))
            if file is None or file["data"] is None or len(file["data"]) != file["length"]:
                return {"ok": False, "error": "file_not_found"}
            file.update(complete=True, title=entry.get("title"))
            done.append({"id": entry["id"], "title": entry.get("title")})
        return {"ok": True, "files": done}

    async def _upload(self, request: web.Request) -> web.Response:
        call = await self._record("upload", request)
        file = self.slack_files.get(request.match_info["file_id"])
        if file is None:
            return web.Response(status=404)
        file["data"] = call.body
        return web.Response(text=f"OK - {len(call.body)}")

    # -- images -----------------------------------------------------------------------------

    async def _image(self, request: web.Request) -> web.Response:
        self.image_gets += 1
        found = self.images.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404)
        data, ctype = found
        return web.Response(body=data, content_type=ctype)


# -- events and outbox items as the pipeline makes them ---------------------------------------

STATUS_OF = {
    "task.submitted": "SUBMITTED",
    "task.modal": "MODAL",
    "task.started": "IN_PROGRESS",
    "task.progress": "IN_PROGRESS",
    "task.stalled": "IN_PROGRESS",
    "task.succeeded": "SUCCESS",
    "task.failed": "FAILURE",
    "task.cancelled": "CANCEL",
    "task.vanished": "IN_PROGRESS",
}


def task_event(n: int | str, type: str, progress: str = "", source: str = "mj", **task: Any) -> Any:
    """An Event of task `n` as the diff makes it: the task JSON in the state `type` implies."""
    from datetime import UTC, datetime

    from bridge.models import Event, event_id

    body = {
        "id": str(n),
        "action": "IMAGINE",
        "status": STATUS_OF.get(type, ""),
        "progress": progress,
        "prompt": "a lighthouse in a storm --ar 16:9",
        "submitTime": 1_764_337_400_000,
        "startTime": 1_764_337_405_000,
        **task,
    }
    return Event(
        id=event_id(source, n, type, body["status"], progress),
        type=type,
        source=source,
        subject=str(n),
        time=datetime(2026, 11, 28, 13, 44, 14, tzinfo=UTC),
        task=body,
    )


def delivery(event: Any, target: str, rule: str = "chat") -> Any:
    """The Delivery the router makes with a rule's default title and body."""
    from bridge import templates
    from bridge.models import Delivery, delivery_id

    ctx = templates.context(event, rule)
    return Delivery(
        id=delivery_id(event.id, target),
        target=target,
        rule=rule,
        event=event,
        title=templates.render_text(
            templates.default_title(event.type), ctx, templates.FALLBACK_TITLE
        ),
        body=templates.render_text(
            templates.default_body(event.type), ctx, templates.FALLBACK_BODY
        ),
    )


def outbox_item(event: Any, target: str, attempts: int = 0, **changes: Any) -> Any:
    """The OutboxItem the deliverer hands a target for `event`."""
    import dataclasses

    from bridge.store import OutboxItem

    d = dataclasses.replace(delivery(event, target), **changes)
    return OutboxItem(
        id=d.id,
        target=target,
        rule=d.rule,
        event=event,
        title=d.title,
        body=d.body,
        group=d.group,
        attempts=attempts,
        created_at=time.time(),
        next_at=time.time(),
        last_error=None,
    )

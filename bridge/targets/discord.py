"""Target: a Discord channel webhook, one embed per task edited in place. The first event of a
task POSTs with `?wait=true` and keeps the message id; later events PATCH that message. Images
are uploaded as `files[0]` when `attach_image` is on, since Discord CDN links expire.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from bridge.config import DiscordTargetConfig
from bridge.errors import DeliveryError
from bridge.models import iso
from bridge.targets.chat import Badge, ChatTarget, MessageGone, TaskView, clip
from bridge.targets.http import classify, request, retry_after
from bridge.targets.images import Image

if TYPE_CHECKING:
    from bridge.roles import MessageRefs

_UNKNOWN_WEBHOOK = 10015  # Discord's JSON error code: the webhook was deleted
_MAX_PAUSE = 5.0  # wait this long in place for a rate-limit bucket; longer goes through the outbox
_MARKDOWN = re.compile(r"([\\*_~`|<>\[\]])")


def escape(text: str) -> str:
    """Task text as literal Discord markdown: no bold, links, spoilers or headings from a prompt."""
    text = _MARKDOWN.sub(r"\\\1", text)
    return re.sub(r"^([#>-])", r"\\\1", text, flags=re.MULTILINE)


def embed(view: TaskView, image: Image | None = None) -> dict[str, Any]:
    """The task message's embed. Discord limits: title 256, description 4096, field values 1024,
    6000 characters in all; the clips below keep within them."""
    description = escape(clip(view.prompt, 2000))
    if view.note:
        description = (description + "\n\n" if description else "") + clip(view.note, 1500)
    fields: list[dict[str, Any]] = []
    if view.action:
        fields.append({"name": "Action", "value": clip(view.action, 100), "inline": True})
    fields.append({"name": "Status", "value": view.status_line, "inline": True})
    if view.took:
        fields.append({"name": "Took", "value": view.took, "inline": True})
    if view.bar:
        fields.append({"name": "Progress", "value": view.bar, "inline": False})
    if view.fail_reason:
        fields.append({"name": "Reason", "value": escape(clip(view.fail_reason, 1000))})
    out: dict[str, Any] = {
        "title": clip(view.title, 256),
        "color": view.badge.colour,
        "fields": fields,
        "footer": {"text": clip(f"{view.source} · task {view.task_id}", 200)},
        "timestamp": iso(view.time),
    }
    if description:
        out["description"] = description
    if image is not None:
        out["image"] = {"url": f"attachment://{image.name}"}
    elif view.image_url:
        out["image"] = {"url": view.image_url}
    return out


def note_embed(title: str, body: str, badge: Badge) -> dict[str, Any]:
    """A one-off message: source events, digests, send-test."""
    out: dict[str, Any] = {"title": clip(title, 256), "color": badge.colour}
    if body:
        out["description"] = clip(body, 4000)
    return out


def _rate_limit_wait(headers: Mapping[str, str], body: Any) -> float | None:
    """Seconds Discord asks to wait: the JSON `retry_after`, else X-RateLimit-Reset-After, else
    Retry-After."""
    if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
        return max(0.0, float(body["retry_after"]))
    for header in ("X-RateLimit-Reset-After", "Retry-After"):
        if (found := retry_after(headers.get(header))) is not None:
            return found
    return None


class DiscordTarget(ChatTarget):
    """Posts and edits through the webhook; needs no bot and no token beyond the webhook's."""

    def __init__(
        self,
        name: str,
        config: DiscordTargetConfig,
        session: aiohttp.ClientSession,
        store: MessageRefs | None = None,
    ) -> None:
        super().__init__(name, config, session, store, [config.discord, config.webhook_token])
        self._hook = f"{config.api_base}/webhooks/{config.webhook_id}/{config.webhook_token}"
        self._thread = {"thread_id": config.thread_id} if config.thread_id else {}
        self._blocked_until = 0.0  # monotonic time the webhook's rate-limit bucket refills

    async def _create(self, view: TaskView, image: Image | None) -> str:
        message = await self._call("POST", self._hook, {"embeds": [embed(view, image)]}, image)
        if not isinstance(message, dict) or "id" not in message:
            raise DeliveryError(
                f"{self.name}: Discord answered without a message id", retryable=True
            )
        return str(message["id"])

    async def _edit(self, message_id: str, view: TaskView, image: Image | None) -> str:
        url = f"{self._hook}/messages/{message_id}"
        await self._call("PATCH", url, {"embeds": [embed(view, image)]}, image, edit=True)
        return message_id

    async def _note(self, title: str, body: str, badge: Badge) -> None:
        await self._call("POST", self._hook, {"embeds": [note_embed(title, body, badge)]}, None)

    async def _call(
        self,
        method: str,
        url: str,
        payload: dict[str, Any],
        image: Image | None,
        *,
        edit: bool = False,
    ) -> Any:
        # A prompt saying "@everyone" must never ping anyone.
        payload = {**payload, "allowed_mentions": {"parse": []}}
        params = {**self._thread} if edit else {"wait": "true", **self._thread}
        data: Any
        if image is None:
            data = orjson.dumps(payload)
            headers = {"content-type": "application/json"}
        else:
            # On an edit Discord keeps exactly the attachments listed; new files are listed by
            # their index in the upload.
            payload["attachments"] = [{"id": 0, "filename": image.name}]
            form = aiohttp.FormData()
            form.add_field(
                "payload_json", orjson.dumps(payload).decode(), content_type="application/json"
            )
            form.add_field(
                "files[0]", image.data, filename=image.name, content_type=image.content_type
            )
            data, headers = form, {}
        await self._pace()
        what = "editing the message" if edit else "posting"
        answer = await request(
            self._session,
            method,
            url,
            what=f"{self.name}: {what}",
            timeout=self._timeout,
            redact=self._redact,
            params=params,
            data=data,
            headers=headers,
        )
        self._note_bucket(answer.headers)
        try:
            body = orjson.loads(answer.body) if answer.body else None
        except orjson.JSONDecodeError:
            body = None
        error = classify(answer.status, answer.headers)
        if error is None:
            return body
        # Discord's quirks: a 404 on an edit is a deleted message (unless the webhook itself is
        # gone); a 429 says how long in its JSON; 401/404 mean the webhook URL is wrong.
        code = body.get("code") if isinstance(body, dict) else None
        if edit and answer.status == 404 and code != _UNKNOWN_WEBHOOK:
            raise MessageGone
        detail = ""
        if isinstance(body, dict) and body.get("message"):
            detail = f": {body['message']}" + (f" (code {code})" if code is not None else "")
        message = self._redact(f"{self.name}: {what}: HTTP {answer.status}{detail}")
        if answer.status == 429:
            wait = _rate_limit_wait(answer.headers, body)
            if wait is not None:
                self._blocked_until = max(self._blocked_until, time.monotonic() + wait)
            raise DeliveryError(message + " (rate limited)", retryable=True, retry_after=wait)
        if answer.status in (401, 404):
            message += " (check the webhook URL: it was deleted or its token is wrong)"
        raise DeliveryError(message, retryable=error.retryable, retry_after=error.retry_after)

    def _note_bucket(self, headers: Mapping[str, str]) -> None:
        """Discord says when a bucket is empty (X-RateLimit-Remaining: 0) and when it refills:
        wait for it rather than run into a 429."""
        if headers.get("X-RateLimit-Remaining") != "0":
            return
        wait = retry_after(headers.get("X-RateLimit-Reset-After"))
        if wait is not None:
            self._blocked_until = max(self._blocked_until, time.monotonic() + wait)

    async def _pace(self) -> None:
        wait = self._blocked_until - time.monotonic()
        if wait <= 0:
            return
        if wait > _MAX_PAUSE:
            raise DeliveryError(
                f"{self.name}: rate limited by Discord for {wait:.1f}s",
                retryable=True,
                retry_after=wait,
            )
        await asyncio.sleep(wait)

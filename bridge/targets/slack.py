"""Target: a Slack channel through a bot token, one Block Kit message per task edited in place:
`chat.postMessage` on the first event, `chat.update` on the kept `ts` after. With `attach_image`
the final image is uploaded (files.getUploadURLExternal, then completeUploadExternal) and shown
from Slack's own storage, since upstream image links expire.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from bridge.config import SlackTargetConfig
from bridge.errors import DeliveryError
from bridge.targets.chat import Badge, ChatTarget, MessageGone, TaskView, clip
from bridge.targets.http import classify, request, retry_after
from bridge.targets.images import Image

if TYPE_CHECKING:
    from bridge.roles import MessageRefs

log = logging.getLogger(__name__)

# Slack answers most failures with HTTP 200 and {"ok": false, "error": "..."}; these are worth
# another try, every other error is about the token, the channel or the message itself.
_RETRYABLE = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
_GONE = frozenset({"message_not_found", "cant_update_message"})


def escape(text: str) -> str:
    """Task text inside mrkdwn: Slack's three control characters, so no links or mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def blocks(view: TaskView, file_id: str | None = None) -> list[dict[str, Any]]:
    """The task message's Block Kit layout. Slack limits: header 150, section text 3000, field
    2000, alt_text 2000. The prompt is plain_text, so nothing in it is formatted."""
    out: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clip(view.title, 150)}}
    ]
    if view.prompt:
        out.append(
            {"type": "section", "text": {"type": "plain_text", "text": clip(view.prompt, 2900)}}
        )
    if view.note:
        out.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": escape(clip(view.note, 2900))}}
        )
    fields = []
    if view.action:
        fields.append(f"*Action*\n{escape(clip(view.action, 100))}")
    fields.append(f"*Status*\n{view.status_line}")
    if view.bar:
        fields.append(f"*Progress*\n{view.bar}")
    if view.took:
        fields.append(f"*Took*\n{view.took}")
    out.append({"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]})
    if view.fail_reason:
        reason = escape(clip(view.fail_reason, 2900))
        out.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Reason*\n{reason}"}})
    alt = clip(view.prompt or f"task {view.task_id}", 2000)
    if file_id is not None:
        out.append({"type": "image", "slack_file": {"id": file_id}, "alt_text": alt})
    elif view.image_url and len(view.image_url) <= 3000:
        out.append({"type": "image", "image_url": view.image_url, "alt_text": alt})
    context = f"{escape(view.source)} · task `{escape(view.task_id)}`"
    out.append({"type": "context", "elements": [{"type": "mrkdwn", "text": clip(context, 300)}]})
    return out


def fallback_text(view: TaskView) -> str:
    """The `text` Slack shows in notifications and to screen readers. Slack reads it as mrkdwn,
    so it is escaped like the blocks: a prompt saying `<!here>` must not ping anyone."""
    parts = [view.title, view.status_line, view.bar]
    return escape(clip(" · ".join(p for p in parts if p), 3000))


def note_text(title: str, badge: Badge) -> str:
    """The `text` of a one-off message, escaped as fallback_text is."""
    return escape(clip(f"{badge.emoji} {title}", 3000))


def note_blocks(title: str, body: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clip(title, 150)}}
    ]
    if body:
        out.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": escape(clip(body, 2900))}}
        )
    return out


class SlackTarget(ChatTarget):
    """Needs a bot token with `chat:write` (and `files:write` for `attach_image`), and the bot
    in the channel. The message reference kept per task is `CHANNEL_ID/ts`."""

    def __init__(
        self,
        name: str,
        config: SlackTargetConfig,
        session: aiohttp.ClientSession,
        store: MessageRefs | None = None,
    ) -> None:
        super().__init__(name, config, session, store, [config.token])
        self.api_base = config.api_base
        self._channel = config.slack
        self._auth = {"Authorization": f"Bearer {config.token}"}

    async def _create(self, view: TaskView, image: Image | None) -> str:
        file_id = await self._upload(image, view) if image is not None else None
        answer = await self._api(
            "chat.postMessage",
            {
                "channel": self._channel,
                "text": fallback_text(view),
                "blocks": blocks(view, file_id),
                "unfurl_links": False,
                "unfurl_media": False,
            },
        )
        channel, ts = answer.get("channel"), answer.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            raise DeliveryError(
                f"{self.name}: Slack answered without channel and ts", retryable=True
            )
        return f"{channel}/{ts}"

    async def _edit(self, message_id: str, view: TaskView, image: Image | None) -> str:
        channel, _, ts = message_id.rpartition("/")
        file_id = await self._upload(image, view) if image is not None else None
        payload = {
            "channel": channel or self._channel,
            "ts": ts,
            "text": fallback_text(view),
            "blocks": blocks(view, file_id),
        }
        await self._api("chat.update", payload, gone=_GONE)
        return message_id

    async def _note(self, title: str, body: str, badge: Badge) -> None:
        await self._api(
            "chat.postMessage",
            {
                "channel": self._channel,
                "text": note_text(title, badge),
                "blocks": note_blocks(title, body),
                "unfurl_links": False,
                "unfurl_media": False,
            },
        )

    async def _upload(self, image: Image, view: TaskView) -> str | None:
        """Upload the image as a Slack file, for an image block to show. None when that fails:
        the message then links the image instead (the update itself matters more)."""
        try:
            ticket = await self._api(
                "files.getUploadURLExternal",
                form={
                    "filename": image.name,
                    "length": str(len(image.data)),
                    "alt_txt": clip(view.prompt or image.name, 1000),
                },
            )
            upload_url, file_id = ticket.get("upload_url"), ticket.get("file_id")
            if not isinstance(upload_url, str) or not isinstance(file_id, str):
                raise DeliveryError("no upload_url/file_id in the answer", retryable=True)
            # The upload URL is pre-signed: the token is not sent there.
            answer = await request(
                self._session,
                "POST",
                upload_url,
                what="upload",
                timeout=self._timeout,
                redact=self._redact,
                data=image.data,
                headers={"content-type": image.content_type},
            )
            if answer.status != 200:
                raise DeliveryError(f"upload answered HTTP {answer.status}", retryable=True)
            files = [{"id": file_id, "title": clip(view.title, 250)}]
            await self._api(
                "files.completeUploadExternal", form={"files": orjson.dumps(files).decode()}
            )
        except DeliveryError as exc:  # a timeout or refused connection is one too (request)
            log.warning(
                "%s: image upload failed (%s); linking it instead",
                self.name,
                self._redact(str(exc)) or type(exc).__name__,
            )
            return None
        return file_id

    async def _api(
        self,
        method: str,
        payload: dict[str, Any] | None = None,
        *,
        form: dict[str, str] | None = None,
        gone: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """One Web API call; the answer's JSON when `ok`. Raises MessageGone for an error in
        `gone`, else a DeliveryError saying whether to retry."""
        url = f"{self.api_base}/{method}"
        data: Any
        if form is not None:
            data, headers = form, dict(self._auth)
        else:
            data = orjson.dumps(payload or {})
            headers = {**self._auth, "content-type": "application/json; charset=utf-8"}
        answer = await request(
            self._session,
            "POST",
            url,
            what=f"{self.name}: {method}",
            timeout=self._timeout,
            redact=self._redact,
            data=data,
            headers=headers,
        )
        try:
            body = orjson.loads(answer.body) if answer.body else {}
        except orjson.JSONDecodeError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        error = body.get("error") if not body.get("ok") else None
        if answer.status == 429 or error == "ratelimited":
            raise DeliveryError(
                f"{self.name}: {method}: rate limited by Slack",
                retryable=True,
                retry_after=retry_after(answer.headers.get("Retry-After")),
            )
        if (failed := classify(answer.status, answer.headers)) is not None:
            raise DeliveryError(
                f"{self.name}: {method}: {failed}",
                retryable=failed.retryable,
                retry_after=failed.retry_after,
            )
        # Slack's quirk: most failures are HTTP 200 with {"ok": false, "error": "..."}.
        if body.get("ok"):
            return body
        error = str(error or "no ok in the answer")
        if error in gone:
            raise MessageGone
        message = self._redact(f"{self.name}: {method}: Slack answered {error}")
        return_hint = {
            "not_in_channel": " (invite the bot to the channel)",
            "channel_not_found": " (check the channel name or id, and that the bot can see it)",
            "invalid_auth": " (check the bot token)",
            "not_authed": " (check the bot token)",
            "missing_scope": " (the bot token needs chat:write, and files:write for images)",
        }.get(error, "")
        raise DeliveryError(message + return_hint, retryable=error in _RETRYABLE)

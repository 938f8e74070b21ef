"""Target: any apprise URL (Slack, Discord, email, json://, 100+ services). One `Apprise` object per
target, so each target's outcome is known; a failure becomes a DeliveryError carrying the reason
apprise logged for that very call, redacted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import aiohttp
import apprise
from apprise.attachment.memory import AttachMemory
from apprise.manager_plugins import NotificationManager

from bridge.config import AppriseTargetConfig
from bridge.config.values import url_secrets
from bridge.errors import DeliveryError, Redactor
from bridge.models import OutboxItem, Status
from bridge.targets.http import retryable_status
from bridge.targets.images import Image, fetch_image
from bridge.templates import digest_text

log = logging.getLogger(__name__)
_APPRISE_LOG = logging.getLogger("apprise")

# apprise logs an HTTP failure as "... error=404." in every HTTP plugin.
_HTTP_ERROR = re.compile(r"error=(\d{3})\b")


@functools.cache
def load_plugins() -> None:
    """apprise imports its plugins on first use, and one of them imports a deprecated stdlib
    module (imghdr, through PGPy). Load them once, with that warning silenced, so it does not
    surface wherever a URL happens to be parsed first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        NotificationManager().load_modules()  # type: ignore[no-untyped-call]


def _retryable(reason: str) -> bool:
    """apprise returns no status code, but its HTTP plugins log one ("error=404."): judged as
    `targets.http.classify` judges it. No code (a connection failure, a timeout) is retryable."""
    codes = [int(c) for c in _HTTP_ERROR.findall(reason)]
    return all(retryable_status(c) for c in codes if c >= 400)


class AppriseTarget:
    """Sends through apprise from worker threads, at most `concurrency` at a time."""

    def __init__(
        self,
        name: str,
        config: AppriseTargetConfig,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.name = name
        self._config = config
        self._session = session  # image downloads (attach_image); apprise does its own sending
        self.private_images: frozenset[str] = frozenset()  # sources allowed private image URLs
        self._redact = Redactor(url_secrets(config.url))
        load_plugins()
        # No apprise-side deadline: the socket timeouts below bound a call, and without a
        # deadline apprise sends in the calling thread instead of handing off to another pool.
        self._asset = apprise.AppriseAsset(app_id="mj-bridge", service_timeout=0)
        self._apprise = apprise.Apprise(asset=self._asset)
        self._service: Any = None
        if self._apprise.add(config.url):
            service = self._apprise[0]
            service.retry = 0  # retries live in deliver.py, persisted; a ?retry= in the URL too
            service.socket_connect_timeout = config.timeout
            service.socket_read_timeout = config.timeout
            if config.rate_limit is not None:
                # Our token bucket paces this target; apprise's own pause would add to it.
                service.request_rate_per_sec = 0
            self._service = service
        self._threads = asyncio.BoundedSemaphore(config.concurrency)
        # Without it apprise takes the body as already in the service's format: a text body in
        # an HTML mail loses every line break.
        self._format = apprise.NotifyFormat(config.format)

    @property
    def supports_attachments(self) -> bool:
        return bool(self._service is not None and self._service.attachment_support)

    async def send(self, item: OutboxItem) -> None:
        image = None
        task = item.event.task or {}
        if (
            self._config.attach_image
            and task.get("status") == Status.SUCCESS
            and self.supports_attachments
            and self._session is not None
        ):
            url = task.get("imageUrl")
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                # Downloaded here, not by apprise: public addresses and image/* only (images.py).
                image = await fetch_image(
                    self._session,
                    url,
                    f"mj-{re.sub(r'[^A-Za-z0-9_-]', '', str(task.get('id') or ''))[:40] or 'task'}",
                    max_bytes=int(self._config.max_image_bytes),
                    deadline=aiohttp.ClientTimeout(total=self._config.timeout),
                    allow_private=self._config.allow_private_images
                    or item.event.source in self.private_images,
                )
                if image is None:
                    log.warning(
                        "%s: the task image was not attached; sending without it", self.name
                    )
        await self._notify(item.title, item.body, image)

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        title, body = digest_text(items)
        await self._notify(title, body, None)

    async def _notify(self, title: str, body: str, image: Image | None) -> None:
        if self._service is None:
            raise DeliveryError(
                f"{self.name}: {self._redact(self._config.url)} is not a valid apprise URL",
                retryable=False,
            )
        async with self._threads:
            ok, reason = await asyncio.to_thread(self._notify_blocking, title, body, image)
        if not ok:
            reason = self._redact(reason)
            raise DeliveryError(f"{self.name}: {reason}", retryable=_retryable(reason))

    def _notify_blocking(self, title: str, body: str, image: Image | None) -> tuple[bool, str]:
        attach = None
        if image is not None:
            attach = apprise.AppriseAttachment(asset=self._asset)
            attach.add(
                AttachMemory(  # type: ignore[no-untyped-call]
                    content=image.data, name=image.name, mimetype=image.content_type
                )
            )
        # apprise captures a call's reasons through its logger, so that logger must pass
        # warnings whatever the process's logging set-up (bridge.logs keeps them off screen).
        if _APPRISE_LOG.getEffectiveLevel() > logging.WARNING:
            _APPRISE_LOG.setLevel(logging.WARNING)
        result = self._apprise.notify(
            body=body or title,
            title=title,
            attach=attach,
            body_format=self._format,
            log_level=logging.WARNING,
        )
        if result:
            return True, ""
        messages = [entry.message for entry in result.logs()]
        reason = " ".join(dict.fromkeys(messages)) or f"apprise reported {result.status.name}"
        return False, reason

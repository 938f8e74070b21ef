"""Targets stage, chat: what the Discord and Slack targets share. One message per task, posted on
its first event and edited in place after: the message reference kept in the store, the order of
states (a message never goes backwards), coalesced edits, the image download, the rendered view.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from bridge import templates
from bridge.config import ChatTargetCommon
from bridge.diff import progress_value
from bridge.errors import DeliveryError, Redactor
from bridge.models import EventType, OutboxItem, Status, status_rank
from bridge.targets.images import Image, fetch_image
from bridge.templates import digest_text

if TYPE_CHECKING:
    from bridge.roles import MessageRefs

log = logging.getLogger(__name__)

FINAL_TYPES = frozenset(
    {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.VANISHED}
)
_MEMORY = 4096  # message references kept in memory per target (the store keeps them all)

Rank = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Badge:
    """How a state reads: its label, emoji and colour (0xRRGGBB)."""

    label: str
    emoji: str
    colour: int


BADGES: dict[str, Badge] = {
    EventType.SUBMITTED: Badge("Queued", "📝", 0x99AAB5),
    EventType.MODAL: Badge("Waiting for input", "✋", 0xFEE75C),
    EventType.STARTED: Badge("Running", "▶️", 0x5865F2),
    EventType.PROGRESS: Badge("Running", "⏳", 0x5865F2),
    EventType.SUCCEEDED: Badge("Succeeded", "✅", 0x57F287),
    EventType.FAILED: Badge("Failed", "❌", 0xED4245),
    EventType.CANCELLED: Badge("Cancelled", "🚫", 0x747F8D),
    EventType.STALLED: Badge("Stalled", "🐢", 0xE67E22),
    EventType.VANISHED: Badge("Vanished", "👻", 0x4F545C),
    EventType.SOURCE_DOWN: Badge("Source down", "🔴", 0xED4245),
    EventType.SOURCE_UP: Badge("Source up", "🟢", 0x57F287),
}
NOTE_BADGE = Badge("Update", "🔔", 0x5865F2)


def progress_bar(percent: int, cells: int = 10) -> str:
    """`▰▰▰▰▱▱▱▱▱▱ 45%`; empty when the progress is unknown (-1)."""
    if percent < 0:
        return ""
    percent = min(percent, 100)
    filled = percent * cells // 100
    return "▰" * filled + "▱" * (cells - filled) + f" {percent}%"


def clip(text: str, limit: int) -> str:
    """At most `limit` characters; a cut ends in an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rank_of(event_type: str, task: dict[str, Any]) -> Rank:
    """Orders the states of one task: status, then progress, then a stall at that progress.
    Final events rank above every unfinished state (a vanished task ends there too)."""
    if event_type in FINAL_TYPES:
        return (4, 0, 0)
    stage = min(status_rank(str(task.get("status") or "")), 3)
    return (stage, progress_value(task.get("progress")), int(event_type == EventType.STALLED))


@dataclass(frozen=True, slots=True)
class MessageRef:
    """The message a task has at a target, what it shows (`rank`) and when it was last written
    (`at`, unix seconds). Kept in the store as compact JSON."""

    id: str
    rank: Rank
    at: float

    def dumps(self) -> str:
        return orjson.dumps({"id": self.id, "rank": self.rank, "at": round(self.at, 3)}).decode()

    @classmethod
    def loads(cls, text: str) -> MessageRef:
        try:
            raw = orjson.loads(text)
            a, b, c = raw["rank"]
            return cls(str(raw["id"]), (int(a), int(b), int(c)), float(raw["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # A bare id (written by hand, or by an older bridge): edit it, whatever it shows.
            return cls(text, (-1, -1, -1), 0.0)


@dataclass(frozen=True, slots=True)
class TaskView:
    """What a task's message shows, the same for every chat service."""

    title: str
    note: str  # the rule's own body; empty when the rule uses the default text
    badge: Badge
    prompt: str
    action: str
    progress: int  # 0..100, -1 when unknown
    image_url: str | None
    fail_reason: str
    took: str
    source: str
    task_id: str
    time: datetime
    final: bool

    @property
    def status_line(self) -> str:
        return f"{self.badge.emoji} {self.badge.label}"

    @property
    def bar(self) -> str:
        """The progress bar: full once succeeded, none once otherwise finished."""
        if self.final:
            return progress_bar(100) if self.badge is BADGES[EventType.SUCCEEDED] else ""
        return progress_bar(self.progress)


def http_url(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith(("http://", "https://")) else None


def view_of(item: OutboxItem) -> TaskView:
    event = item.event
    task = event.task or {}
    ctx = templates.context(event, item.rule)
    default_body = templates.render_text(
        templates.default_body(event.type), ctx, templates.FALLBACK_BODY
    )
    prompt = task.get("prompt") or task.get("promptEn") or task.get("description") or ""
    return TaskView(
        title=item.title or templates.oneline(prompt) or f"task {event.subject}",
        note="" if item.body == default_body else item.body,
        badge=BADGES.get(event.type, NOTE_BADGE),
        prompt=str(prompt).strip(),
        action=str(task.get("action") or ""),
        progress=progress_value(task.get("progress")),
        image_url=http_url(task.get("imageUrl")),
        fail_reason=str(task.get("failReason") or "") if event.type != EventType.SUCCEEDED else "",
        took=templates.took(task) if event.type in FINAL_TYPES else "",
        source=event.source,
        task_id=str(task.get("id") or event.subject),
        time=event.time,
        final=event.type in FINAL_TYPES,
    )


class MessageGone(Exception):
    """The message to edit no longer exists (deleted in the channel): post a new one."""


class ChatTarget:
    """One message per task, edited in place. Subclasses speak the service's API:
    `_create` posts a task message and returns its id, `_edit` edits it (raises MessageGone when
    it was deleted), `_note` posts a one-off message (source events, digests, send-test).

    Order and pace, per task (`source:task_id`), under a per-task lock:
    - a state that ranks at or below what the message shows is dropped (deliveries may arrive
      out of order or be replayed: a message never goes backwards);
    - an unfinished state that comes less than `min_edit_interval` after the last write is
      deferred through the outbox (a retryable DeliveryError with `retry_after`), and when it
      comes back it is dropped if a newer state is waiting: the newest one is what gets shown;
    - a final state is always written at once.
    """

    def __init__(
        self,
        name: str,
        config: ChatTargetCommon,
        session: aiohttp.ClientSession,
        store: MessageRefs | None,
        secrets: Sequence[str],
    ) -> None:
        self.name = name
        self._config = config
        self._session = session
        self._store = store
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._redact = Redactor(list(secrets))
        self._refs: OrderedDict[str, MessageRef] = OrderedDict()
        self._waiting: OrderedDict[str, Rank] = OrderedDict()  # newest deferred state per task
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        # Sources whose images may come from private addresses (their allow_private_images).
        self.private_images: frozenset[str] = frozenset()

    # -- the Target seam --------------------------------------------------------------------

    async def send(self, item: OutboxItem) -> None:
        task = item.event.task
        if task is None or not item.event.subject:
            await self._note(item.title, item.body, BADGES.get(item.event.type, NOTE_BADGE))
            return
        key = f"{item.event.source}:{item.event.subject}"
        async with self._locked(key):
            await self._update(key, item, task)

    async def send_digest(self, items: Sequence[OutboxItem]) -> None:
        """A digest is one new message listing its deliveries; task messages are not touched."""
        title, body = digest_text(items)
        await self._note(title, body, NOTE_BADGE)

    # -- one task's message -----------------------------------------------------------------

    async def _update(self, key: str, item: OutboxItem, task: dict[str, Any]) -> None:
        rank = rank_of(item.event.type, task)
        final = item.event.type in FINAL_TYPES
        ref = await self._ref(key)
        if ref is not None and rank <= ref.rank:
            log.debug("%s: %s already shows a newer state; dropped", self.name, key)
            return
        if not final:
            newer = self._waiting.get(key)
            if newer is not None and newer > rank:
                log.debug("%s: %s has a newer state waiting; dropped", self.name, key)
                return
            if ref is not None:
                wait = ref.at + self._config.min_edit_interval - time.time()
                # A deferral counts as an attempt in the outbox: never let it use up the last.
                limit = self._config.max_attempts
                if wait > 0 and (limit is None or item.attempts + 2 < limit):
                    self._remember(self._waiting, key, rank)
                    raise DeliveryError(
                        f"{self.name}: coalesced: task {item.event.subject} was updated "
                        f"{self._config.min_edit_interval - wait:.2f}s ago; shown in {wait:.2f}s "
                        "unless a newer state comes first",
                        retryable=True,
                        retry_after=wait,
                        deferred=True,
                    )
        view = view_of(item)
        image = None
        if (
            self._config.attach_image
            and item.event.type == EventType.SUCCEEDED
            and str(task.get("status") or "") == Status.SUCCESS
            and view.image_url is not None
        ):
            image = await fetch_image(
                self._session,
                view.image_url,
                f"mj-{re.sub(r'[^A-Za-z0-9_-]', '', view.task_id)[:40] or 'task'}",
                max_bytes=int(self._config.max_image_bytes),
                deadline=self._timeout,
                allow_private=self._config.allow_private_images
                or item.event.source in self.private_images,
            )
        if ref is None:
            message_id = await self._create(view, image)
        else:
            try:
                message_id = await self._edit(ref.id, view, image)
            except MessageGone:
                log.warning("%s: the message of %s was deleted; posting a new one", self.name, key)
                message_id = await self._create(view, image)
        await self._keep(key, MessageRef(message_id, rank, time.time()))
        if (waiting := self._waiting.get(key)) is not None and waiting <= rank:
            del self._waiting[key]

    async def _ref(self, key: str) -> MessageRef | None:
        ref = self._refs.get(key)
        if ref is None and self._store is not None:
            text = await self._store.get_message(self.name, key)
            if text is not None:
                ref = MessageRef.loads(text)
                self._remember(self._refs, key, ref)
        return ref

    async def _keep(self, key: str, ref: MessageRef) -> None:
        self._remember(self._refs, key, ref)
        if self._store is not None:
            await self._store.put_message(self.name, key, ref.dumps())

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _MEMORY:
            cache.popitem(last=False)

    @asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[None]:
        """One send at a time per task; the lock lives only while someone holds or awaits it."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    # -- the service's API (subclasses) -----------------------------------------------------

    async def _create(self, view: TaskView, image: Image | None) -> str:
        raise NotImplementedError

    async def _edit(self, message_id: str, view: TaskView, image: Image | None) -> str:
        raise NotImplementedError

    async def _note(self, title: str, body: str, badge: Badge) -> None:
        raise NotImplementedError

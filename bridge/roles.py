"""What each stage asks of the store: one small protocol per consumer (arq's typing.py, httpx's
transports), so a stage depends on the few calls it makes, not on the whole Store. Both store
backends provide every one of them. A new read query (an events API, say) goes into `Stats` or a
protocol of its own.

    TaskStates   watch/, `bridge track`        task states, snapshots, source health
    Outbox       deliver/                      claims, acks, retries, dead letters made
    DeadLetters  `bridge dlq`, the server      listing and replaying dead letters
    Leases       lease.py                      who polls a source
    MessageRefs  chat targets                  the chat message kept per task
    Stats        status page, metrics          what the outbox holds and what happened lately
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from bridge.models import Delivery, Event, Outage, OutboxItem, TaskState

if TYPE_CHECKING:
    from bridge.store.rows import OutboxRow


class TaskStates(Protocol):
    async def load_tasks(
        self, source: str, *, unfinished: bool = False
    ) -> dict[str, TaskState]: ...

    async def source_seen(self, source: str) -> bool: ...

    async def commit(
        self,
        source: str,
        states: Mapping[str, TaskState],
        events: Sequence[Event],
        deliveries: Sequence[Delivery],
        *,
        seen: bool = True,
        progress: Callable[[], None] | None = None,
        step: Callable[[], None] | None = None,
    ) -> list[Event]: ...

    async def load_outage(self, source: str) -> Outage | None: ...

    async def save_outage(self, source: str, outage: Outage | None) -> None: ...


class Outbox(Protocol):
    async def claim(self, target: str, now: float, limit: int) -> list[OutboxItem]: ...

    async def release(self, ids: Sequence[str]) -> None: ...

    async def mark_sent(self, ids: Sequence[str]) -> None: ...

    async def mark_retry(self, id: str, next_at: float, error: str) -> None: ...

    async def mark_dead(self, id: str, error: str) -> None: ...

    async def next_due(self, target: str) -> float | None: ...

    async def abandon(self, targets: Collection[str]) -> dict[str, int]: ...

    async def recover(self) -> int: ...

    async def keep_claims(self) -> None: ...


class DeadLetters(Protocol):
    async def dead_letters(self, limit: int = 100) -> list[OutboxItem]: ...

    async def replay(self, ids: Sequence[str] | None) -> int: ...


class Leases(Protocol):
    async def try_lease(self, name: str, holder: str, ttl: float) -> bool: ...

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool: ...

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def lease(self, name: str) -> tuple[str, float] | None: ...


class MessageRefs(Protocol):
    async def get_message(self, target: str, key: str) -> str | None: ...

    async def put_message(self, target: str, key: str, ref: str) -> None: ...


class Stats(Protocol):
    async def recent_events(self, limit: int = 50) -> list[Event]: ...

    async def recent_deliveries(self, limit: int = 50) -> list[OutboxRow]: ...

    async def outbox_depth(self) -> dict[str, int]: ...

    async def dead_count(self) -> dict[str, int]: ...

"""The outbox stage's one retry policy: each backend translates its driver's errors into
`StoreError` at its boundary (a table in sqlite_errors.py and postgres_errors.py), and every
call that met a transient one (locked, busy, disk full, connection lost) runs again here, with
backoff, for up to `retry_for` seconds. Every call is one transaction that either committed or
rolled back whole, so running it again loses nothing and stores nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from bridge.errors import StoreError

log = logging.getLogger("bridge.store")

T = TypeVar("T")

#: Seconds a call is tried again while the database is in transient trouble; then the error
#: stands, and `bridge run` stops (exit 1) as for a database it cannot open.
RETRY_FOR = 60.0

#: Kinds of transient error that are no trouble: two transactions crossed and one runs again.
QUIET_KINDS = frozenset({"conflict"})


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StoreError) and exc.transient


class Retrier:
    """Runs store calls, again while they fail transiently. `trouble` says what is wrong while a
    call is being retried (None when the last call went through): `/readyz` reports not ready
    then. `on_retry(kind)` counts each retry (metrics)."""

    def __init__(self, where: str, *, retry_for: float = RETRY_FOR) -> None:
        self.where = where
        self.retry_for = retry_for
        self.trouble: str | None = None
        self.on_retry: Callable[[str], None] | None = None

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self.trouble is None:
            try:  # the usual case, without building a retry policy per call (the hot path)
                return await call()
            except StoreError as exc:
                if not exc.transient:
                    raise
                self._note(exc)
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_delay(self.retry_for),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        result: T = await retrying(call)
        if self.trouble is not None:
            log.warning("database %s: working again", self.where)
            self.trouble = None
        return result

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, StoreError):
            self._note(exc)

    def _note(self, exc: StoreError) -> None:
        kind = exc.kind
        if self.on_retry is not None:
            self.on_retry(kind)
        if kind in QUIET_KINDS:
            return
        if self.trouble is None:
            log.warning(
                "database %s: %s; trying again for up to %.0fs (not ready meanwhile)",
                self.where,
                exc,
                self.retry_for,
            )
        self.trouble = str(exc)

"""Choosing how to read a source: `mode: auto` asks the upstream which inquiry endpoints it serves
and picks the cheapest way; the explicit modes check only what they need.
Pipeline: **source** (probe -> reader) -> snapshot -> diff.

The order, cheapest first: /mj/task/query (plus) or /mj/task/queue (midjourney-proxy) -> active;
/mj/task/list (trueai caps it at 100, so reading it whole is cheap) -> list; list-by-condition or
fetch alone (new-api relays) -> ids. An endpoint that is missing (404, 405, new-api's HTML page,
an answer of the wrong shape) is skipped; any other failure (timeout, auth, 5xx on the list) fails
the probe like a failed poll, and the watcher probes again at the next poll. So does an answer with
rows without a usable id: the endpoint is there but serves junk now, which proves nothing about it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal

from bridge.config import SourceConfig
from bridge.errors import SourceError
from bridge.models import UNFINISHED
from bridge.sources.junk import UnusableRows
from bridge.sources.modes import SMALL_LIST, ActiveReader, IdsReader, ListReader, Reader
from bridge.sources.poll import TaskAPI

__all__ = ["choose_reader"]

Discover = Literal["query", "queue"]

# Failures that say "this endpoint is not here", as opposed to "the server is not answering".
_ABSENT = frozenset({"not_a_task_api", "bad_payload"})
# A missing optional endpoint may also answer 4xx/5xx of its own (a fork's error handler).
_OPTIONAL_ABSENT = _ABSENT | {"server_error"}


async def _serves(source: TaskAPI, call: Awaitable[object], absent: frozenset[str]) -> bool:
    with source.tally() as tally:
        try:
            await call
        except UnusableRows:
            raise  # there, but serving junk: decide at the next poll, not now
        except SourceError as exc:
            if exc.reason in absent:
                return False
            raise
        if tally.junk:
            raise UnusableRows(
                f"{tally.describe()}: not taken as a working endpoint; probing again at the next "
                "poll"
            )
    return True


async def _discovery(source: TaskAPI) -> Discover | None:
    if await _serves(source, source.query(UNFINISHED, 0, 1), _OPTIONAL_ABSENT):
        return "query"
    if await _serves(source, source.queue(), _OPTIONAL_ABSENT):
        return "queue"
    return None


async def _ids(source: TaskAPI) -> IdsReader | None:
    if await _serves(source, source.check_lookup(), _ABSENT):
        return IdsReader(source)
    if await _serves(source, source.fetch("0"), _ABSENT):
        return IdsReader(source, "fetch", "GET /mj/task/{id}/fetch of each tracked unfinished task")
    return None


def push_hint(config: SourceConfig) -> str:
    """The exact lines that turn push callbacks on for this source."""
    # <...> placeholders: a log line keeps them (a `token=VALUE` would be redacted).
    hook = f"http://<bridge>:8787/hooks/{config.name}?token=<push_token>"
    if config.push_token:
        return (
            f"push_token is set; point midjourney-proxy at it with `mj.notify-hook: {hook}` "
            "(application.yml), <push_token> being this source's push_token"
        )
    return (
        f"add `push_token: ${{MJ_PUSH_TOKEN}}` to source {config.name} and set "
        f"`mj.notify-hook: {hook}` in midjourney-proxy's application.yml"
    )


def _active(
    config: SourceConfig, source: TaskAPI, discover: Discover, *, auto: bool = False
) -> Reader:
    how = f"{_HOW[discover]}; the full list at start and every {config.full_every:g}s"
    small = SMALL_LIST if auto and discover == "queue" else None
    if small is not None:
        how += f", and each poll while it holds at most {small} tasks"
    return ActiveReader(
        source, discover, config.full_every, how, small_list=small, push_hint=push_hint(config)
    )


_HOW = {
    "query": "POST /mj/task/query (unfinished and newest pages) + list-by-condition of the "
    "tracked unfinished tasks",
    "queue": "GET /mj/task/queue + list-by-condition of the tracked unfinished tasks",
}


async def choose_reader(config: SourceConfig, source: TaskAPI) -> tuple[Reader, str]:
    """The reader for the source's `mode:` and why it was chosen (one line for the log).
    Raises SourceError when the upstream serves none of what the mode needs."""
    match config.mode:
        case "list":
            return ListReader(source), "mode: list (configured)"
        case "ids":
            ids = await _ids(source)
            if ids is None:
                raise SourceError(
                    "not_a_task_api",
                    "mode: ids needs POST /mj/task/list-by-condition or GET /mj/task/{id}/fetch; "
                    "this server serves neither",
                )
            return ids, "mode: ids (configured)"
        case "active":
            discover = await _discovery(source)
            if discover is None:
                fallback = ActiveReader(source, "list", config.full_every, "GET /mj/task/list")
                return fallback, (
                    "mode: active (configured), but neither /mj/task/query nor /mj/task/queue "
                    "answered: new tasks are discovered through /mj/task/list (trueai caps it at "
                    "100, so this costs the same as mode: list)"
                )
            return _active(config, source, discover), "mode: active (configured)"
    discover = await _discovery(source)
    if discover == "queue":
        # The queue misses tasks that start and end between polls; a small list is read whole.
        size = len((await source.list_tasks()).tasks)
        reader = _active(config, source, discover, auto=True)
        if size <= SMALL_LIST:
            return reader, (
                f"auto: /mj/task/queue answers but shows no task that starts and ends between "
                f"two polls; the list holds {size} tasks (at most {SMALL_LIST}), so it is read "
                "whole each poll"
            )
        return reader, (
            f"auto: /mj/task/queue answers; the list holds {size} tasks (over {SMALL_LIST}), so "
            "only unfinished tasks are read each poll"
        )
    if discover is not None:
        why = f"auto: /mj/task/{discover} answers, so only unfinished tasks are read each poll"
        return _active(config, source, discover), why
    if await _serves(source, source.list_tasks(), _ABSENT):
        return ListReader(source), (
            "auto: no /mj/task/query or /mj/task/queue here; /mj/task/list answers (trueai "
            "caps it at 100 newest, so reading it each poll stays cheap)"
        )
    found = await _ids(source)
    if found is not None:
        return found, (
            "auto: no /mj/task/list here (a relay such as new-api): following only the tasks "
            "the bridge learns of (pass-through submits, POST /track, push callbacks)"
        )
    raise SourceError(
        "not_a_task_api",
        "none of /mj/task/query, /queue, /list, /list-by-condition or /{id}/fetch answered as a "
        "task API: base_url should be the server's root, without /mj",
    )

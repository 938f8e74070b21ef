"""The peer of the polling figures: the poller a user would write instead of the bridge. A loop
that GETs /mj/task/list with aiohttp (or, on a relay without a list, POSTs the ids it submitted to
/mj/task/list-by-condition), keeps {id: (status, progress)} of the previous snapshot and POSTs
each task whose pair changed, as JSON, to a webhook; then sleeps the interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

LIST = "/mj/task/list"
BY_IDS = "/mj/task/list-by-condition"


class NaivePoller:
    """No persistence, no retries, no rules, no signature: each change is one awaited POST of the
    task as the upstream served it. The first cycle only records what is there (a user does not
    want every old task posted at start), like the bridge's silent first contact.

    `on_post(task)` runs after each POST has been answered (the latency figure paces its changes
    by it; it costs a dict lookup)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        headers: dict[str, str],
        webhook: str,
        on_post: Callable[[dict[str, Any]], None] | None = None,
        ids: Callable[[], list[str]] | None = None,
    ) -> None:
        self.session = session
        self.url = base_url + (LIST if ids is None else BY_IDS)
        self.ids = ids  # the ids a script submitted, for a relay without a list (new-api)
        self.headers = headers
        self.webhook = webhook
        self.on_post = on_post
        self.previous: dict[str, tuple[Any, Any]] | None = None
        self.posted = 0

    async def cycle(self) -> int:
        """One poll: GET the list, POST the changes. Returns how many it posted."""
        if self.ids is None:
            request = self.session.get(self.url, headers=self.headers)
        else:
            request = self.session.post(self.url, headers=self.headers, json={"ids": self.ids()})
        async with request as response:
            response.raise_for_status()
            tasks = await response.json()
        previous, current = self.previous, {}
        posted = 0
        for task in tasks:
            state = (task.get("status"), task.get("progress"))
            current[task["id"]] = state
            if previous is not None and previous.get(task["id"]) != state:
                async with self.session.post(self.webhook, json=task) as reply:
                    reply.raise_for_status()
                posted += 1
                if self.on_post is not None:
                    self.on_post(task)
        self.previous = current
        self.posted += posted
        return posted

    async def run(self, interval: float) -> None:
        """Poll forever (until cancelled): a cycle, then `interval` of sleep, as a script would."""
        while True:
            await self.cycle()
            await asyncio.sleep(interval)

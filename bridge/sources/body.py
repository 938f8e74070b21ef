"""An answer's body, read within `max_response`. Pipeline: **source** -> snapshot -> diff.
Every request a source makes reads its answer here (poll.py)."""

from __future__ import annotations

import aiohttp

from bridge.errors import SourceError
from bridge.sources.normalize import Body

__all__ = ["read_body"]

CHUNK = 1 << 16


async def read_body(response: aiohttp.ClientResponse, where: str, limit: int) -> Body:
    """The body, counted while it streams: an answer over `limit` (one that never ends, say)
    fails the poll with `too_large` instead of filling the memory."""
    too_large = SourceError(
        "too_large",
        f"{where}: the answer is larger than max_response ({limit:,} bytes); "
        "raise max_response if the list is really this large",
    )
    if response.content_length is not None and response.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        if len(body) + len(chunk) > limit:
            raise too_large
        body += chunk
    return body  # a bytearray: no second copy of a large answer

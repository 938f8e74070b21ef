"""The simulator's task images: a small PNG per attachment path, a 2x2 grid of gradients whose
colours come from the path, so each task's thumbnail looks like a Midjourney grid and differs from
the next (what the status page and the chat mock-ups show)."""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

SIZE = 96


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=256)
def picture(key: str, size: int = SIZE) -> bytes:
    """An RGB PNG of `size` x `size` pixels, the same for the same key."""
    digest = hashlib.sha256(key.encode()).digest()
    tiles = [tuple(digest[i * 3 : i * 3 + 3]) for i in range(4)]
    half = size // 2
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # filter: none
        for x in range(size):
            r, g, b = tiles[(y >= half) * 2 + (x >= half)]
            shade = 0.55 + 0.45 * ((x % half) + (y % half)) / size
            gap = x in (half - 1, half) or y in (half - 1, half)
            row += bytes(
                (255, 255, 255) if gap else (int(r * shade), int(g * shade), int(b * shade))
            )
        rows.append(bytes(row))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
        + _chunk(b"IEND", b"")
    )

"""Reading a task list without parsing what did not change. Pipeline: **source** -> snapshot.

A finished task's bytes are the same from poll to poll, and the bridge already holds it as
finished, so the diff would skip it after two lookups anyway: parsing it again is most of a poll's
cost. `ListSpans.parse` splits the list's JSON array into one byte span per task, hashes each, and
parses only the spans it has not seen in the previous read, plus those of tasks the bridge does not
hold as finished (`settled(id)` is False: new, unfinished, tracked, or a change that failed to
commit). Unchanged settled tasks are left out of the result (`Normalized.unchanged` counts them):
the diff has nothing to do for them.

Why the split cannot change the answer: the array is split at `}, {"<first key>":` (JSON
whitespace allowed around the comma), where the first key is the first object's first key (`id`
on every server seen). Each span becomes `{"<key>":` + span + `}` again. If every span parses on
its own as a JSON value, the whole body is `[` value `,` value ... `]`, which is valid JSON with
exactly those items (JSON's grammar is unambiguous), so the result equals a full parse, even when
the separator happened to sit inside a string or a nested object. A span seen in the previous read
parsed then, byte for byte (same hash and length). Anything else (a span that does not parse, a
body that is not `[{"key": ...}]`, a first key that is not a plain name) falls back to the full
parse of normalize.py, with its errors. The hash is Python's keyed SipHash of the span: an upstream
cannot aim a collision at a key it does not know (PYTHONHASHSEED left random, the default).

Memory kept between reads: one hash, length and id per task of the last read (about 100 B a
task), never the parsed tasks nor the previous body.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import orjson

from bridge.sources.normalize import Body, Dropped, Normalized, normalize_tasks, parse_tasks

__all__ = ["ListSpans"]

_WS = b" \t\n\r"  # JSON's whitespace (not \v nor \f, which bytes.strip would also take)
# A span of a `bytes` answer is hashed in place (a memoryview hashes its bytes as `bytes` does);
# a bytearray's view cannot be hashed, and copying each span out costs an allocation a task (over
# pymalloc's 512 bytes, so glibc's, slow in a heap a large poll fragmented). So a bytearray answer
# up to this size is copied to `bytes` once; a larger one keeps the copy per span and never holds
# a second copy of the whole.
WHOLE_COPY = 64 * 1024 * 1024
_HEAD = re.compile(rb'[ \t\n\r]*\[[ \t\n\r]*\{[ \t\n\r]*"([A-Za-z_][A-Za-z0-9_]{0,63})"[ \t\n\r]*:')


def _close(data: Body) -> int:
    """Where the last object's closing brace is, when the body ends `}]` (whitespace allowed)."""
    end = len(data)
    for want in b"]}":
        while end and data[end - 1] in _WS:
            end -= 1
        if not end or data[end - 1] != want:
            return -1
        end -= 1
    return end


class _Unexpected(Exception):
    """The body is not the shape the split expects: parse it whole."""


class ListSpans:
    """The span hashes of one source's last list read; one per TaskAPI. Large reads are parsed in
    a worker thread (poll.py), and one that a lost lease abandoned may still run when the next
    starts: a lock keeps them one at a time."""

    __slots__ = ("_key", "_lock", "_seen", "_sep", "fallbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[int, str]] = {}  # hash(span) -> (len(span), task id)
        self._key = b""
        self._sep: re.Pattern[bytes] | None = None
        self.fallbacks = 0  # reads parsed whole because the split did not fit (for tests)

    def parse(self, body: Body, settled: Callable[[str], bool]) -> Normalized:
        """The list's tasks, as `parse_tasks(body)` gives them, less the unchanged tasks for which
        `settled(id)` is True. Raises what `parse_tasks` raises for a bad body."""
        with self._lock:
            try:
                return self._split(body, settled)
            except _Unexpected:
                self.fallbacks += 1
                self._seen = {}
                return parse_tasks(body)

    def _separator(self, key: bytes) -> re.Pattern[bytes]:
        if self._sep is None or key != self._key:
            ws = rb"[ \t\n\r]*"
            self._sep = re.compile(
                rb"\}" + ws + b"," + ws + rb"\{" + ws + b'"' + key + b'"' + ws + b":"
            )
            self._key = key
        return self._sep

    def _split(self, body: Body, settled: Callable[[str], bool]) -> Normalized:
        head = _HEAD.match(body)
        end = _close(body)
        if head is None or end <= head.end():
            raise _Unexpected
        prefix = b'{"' + head.group(1) + b'":'
        if isinstance(body, bytearray) and len(body) <= WHOLE_COPY:
            body = bytes(body)
        in_place = isinstance(body, bytes)
        separator = self._separator(head.group(1))
        seen = self._seen
        kept: dict[int, tuple[int, str]] = {}
        items: list[Any] = []
        where: list[int] = []
        hashes: list[tuple[int, int]] = []
        unchanged = 0
        index = 0
        # One span at a time (hashed in place, or a copy of its bytes hashed and dropped): a large
        # answer is never held twice.
        with memoryview(body) as view:
            start = head.end()
            bounds = [(m.start(), m.end()) for m in separator.finditer(body, start, end)]
            bounds.append((end, end))
            for stop, after in bounds:
                span = view[start:stop] if in_place else bytes(view[start:stop])
                size = stop - start
                start = after
                key = hash(span)
                known = seen.get(key)
                if known is not None and known[0] == size and settled(known[1]):
                    kept[key] = known
                    unchanged += 1
                else:
                    try:
                        items.append(orjson.loads(prefix + span + b"}"))
                    except orjson.JSONDecodeError:
                        raise _Unexpected from None
                    where.append(index)
                    hashes.append((key, size))
                index += 1
        result = normalize_tasks(items, strict=True)
        if result.dropped:
            dropped = [Dropped(where[d.index], d.reason) for d in result.dropped]
            bad = {d.index for d in result.dropped}
            hashes = [h for i, h in enumerate(hashes) if i not in bad]
        else:
            dropped = []
        for (key, size), task in zip(hashes, result.tasks, strict=True):
            kept[key] = (size, task["id"])
        self._seen = kept
        return Normalized(result.tasks, dropped, unchanged)

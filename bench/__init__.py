"""Benchmarks beside the pipeline: each figure measures a stage of the bridge against what a user
would pick instead, in the same run (absolute times drift between runs; ratios hold up).
`python -m bench` (`make bench`) runs every figure and writes bench/results.md and the README table.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Row", "fmt_bytes", "fmt_rate", "fmt_time", "median_time", "percentile", "ratio"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table. `target` says what the issue asks and whether it is met."""

    figure: str
    ours: str
    peer: str = "—"
    ratio: str = "—"
    target: str = ""
    short: str = ""  # the figure's name in the README's compact table; `figure` when empty

    @property
    def label(self) -> str:
        return self.short or self.figure


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """The median wall time of `repeat` calls of `fn`, in seconds, with the collector quiet during
    each call (it is run between calls) so a collection of the previous call's garbage does not
    land in this one's time."""
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.001:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1_000_000:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1_000_000), ("KB", 1000)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s"


def ratio(ours: float, peer: float) -> str:
    """ours ÷ peer: "1.23x", "375x", or "1/280x" when ours is the far smaller one."""
    if peer <= 0 or ours <= 0:
        return "—"
    value = ours / peer
    if value < 0.1:
        return f"1/{peer / ours:.0f}x"
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"

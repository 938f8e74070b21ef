"""The benches' output: bench/results.md (every table, with the machine and versions it ran on) and
the table between the README's `<!-- bench:start -->` and `<!-- bench:end -->` markers.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench import Row

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PACKAGES = ("orjson", "aiohttp", "aiosqlite", "apprise", "deepdiff")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row], *, short: bool = False) -> str:
    lines = ["| figure | ours | peer | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = (r.label if short else r.figure, r.ours, r.peer, r.ratio, r.target or "—")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def environment(seconds: float, load: tuple[float, float, float]) -> str:
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    return (
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {_cpu()} ({os.cpu_count()} cores), "
        f"{platform.system()} {platform.release()}; Python {sys.version.split()[0]}; {versions}; "
        f"commit {_commit()}; took {seconds:.0f} s; load average at start "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}."
    )


def results_md(sections: dict[str, list[Row]], env: str) -> str:
    parts = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand. What each figure "
        "measures and how: [docs/performance.md](../docs/performance.md). Peers are measured in "
        "the same run; compare ratios, not absolute times, across runs.",
        "",
        env,
    ]
    for title, rows in sections.items():
        parts += ["", f"## {title}", "", table(rows)]
    return "\n".join(parts) + "\n"


def readme_block(sections: dict[str, list[Row]], env: str) -> str:
    rows = [r for rows in sections.values() for r in rows]
    return "\n".join(
        [
            table(rows, short=True),
            "",
            "Ratio = ours ÷ peer (lower is better for times and bytes, higher for rates). "
            f"{env} Reproduce with `make bench` (about 3 minutes); the full results are in "
            "[bench/results.md](bench/results.md).",
        ]
    )


def update_readme(path: Path, block: str) -> bool:
    """Rewrite what is between the markers; False (README untouched) when they are missing."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return False
    path.write_text(text[: start + len(START)] + "\n" + block + "\n" + text[end:], encoding="utf-8")
    return True

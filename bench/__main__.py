"""`python -m bench` (`make bench`): runs every figure, prints the table, writes bench/results.md
and the README's Performance table. A figure that cannot run says "n/a (why)" instead of failing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import Row, brokers, delivery, diff, latency, process, report, upstream

FIGURES: dict[str, tuple[str, Callable[[bool], list[Row]]]] = {
    "diff": ("Diff: parse + normalise + diff of one poll", diff.run),
    "delivery": ("Delivery: durable outbox to a webhook", delivery.run),
    "brokers": ("Brokers: durable outbox into NATS, RabbitMQ, Redis and MQTT", brokers.run),
    "latency": ("End-to-end latency: a task changes -> the webhook arrives", latency.run),
    "upstream": ("Upstream cost in steady state", upstream.run),
    "process": ("The whole process: memory, start-up, retention", process.run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one round (a smoke run; writes nothing)"
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated figures to run: {', '.join(FIGURES)}"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--results", type=Path, default=report.ROOT / "bench" / "results.md")
    parser.add_argument("--readme", type=Path, default=report.ROOT / "README.md")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(FIGURES)
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")

    load = os.getloadavg()
    started = time.perf_counter()
    sections: dict[str, list[Row]] = {}
    for name in chosen:
        title, run = FIGURES[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        begun = time.perf_counter()
        try:
            rows = run(args.quick)
        except Exception as exc:
            traceback.print_exc()
            rows = [Row(title, f"n/a ({type(exc).__name__}: {exc})")]
        print(f"bench: {name} took {time.perf_counter() - begun:.0f} s", file=sys.stderr)
        sections[title] = rows

    env = report.environment(time.perf_counter() - started, load)
    for title, rows in sections.items():
        print(f"\n## {title}\n\n{report.table(rows)}")
    print(f"\n{env}")
    if args.quick or args.no_write:
        return 0
    args.results.write_text(report.results_md(sections, env), encoding="utf-8")
    print(f"bench: wrote {args.results}", file=sys.stderr)
    if len(sections) < len(FIGURES):
        print("bench: README left alone (not every figure ran)", file=sys.stderr)
    elif not report.update_readme(args.readme, report.readme_block(sections, env)):
        print(
            f"bench: no {report.START} ... {report.END} markers in {args.readme}", file=sys.stderr
        )
    else:
        print(f"bench: updated the table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

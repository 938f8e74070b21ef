"""bench/ at tiny sizes, so the benchmarks keep running as the code changes. No timing is asserted:
speed is what `make bench` reports, not what a test checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench import Row, brokers, delivery, diff, latency, process, report, upstream


@pytest.mark.parametrize(
    "run",
    [diff.run, delivery.run, brokers.run, latency.run, upstream.run, process.run],
    ids=["diff", "delivery", "brokers", "latency", "upstream", "process"],
)
def test_figure_runs_at_a_tiny_size(run: Callable[[bool], list[Row]]) -> None:
    rows = run(True)
    assert rows
    for row in rows:
        assert row.figure
        assert not row.ours.startswith("n/a"), row
        # Every figure has a peer measured in the same run (issue 9's audit), so a ratio too.
        assert row.peer not in ("", "—"), row
        assert not row.peer.startswith("n/a"), row
        assert "ideal" not in row.peer, row
        assert row.ratio not in ("", "—"), row


def test_report_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{report.START}\nold\n{report.END}\n\n## More\n")
    sections = {"Diff": [Row("Diff 10 tasks", "1.0 ms", "2.0 ms", "0.50x", "<= 1.5x: met")]}
    assert report.update_readme(readme, report.readme_block(sections, "Run somewhere."))
    text = readme.read_text()
    assert "old" not in text
    assert "| Diff 10 tasks | 1.0 ms | 2.0 ms | 0.50x | <= 1.5x: met |" in text
    assert text.startswith("# x\n\n## Performance\n")
    assert text.endswith(f"{report.END}\n\n## More\n")
    assert "## Diff" in report.results_md(sections, "Run somewhere.")


def test_report_leaves_a_readme_without_markers_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert not report.update_readme(readme, "table")
    assert readme.read_text() == "# x\n"

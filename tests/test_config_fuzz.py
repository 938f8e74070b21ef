"""Fuzzing `bridge check` with generated config documents: random YAML-ish text and mutations of
the documented whole file. Whatever the file holds, check ends with exit 0 or 2 and FILE:LINE:COL
lines, never a traceback, and within a bound (a hang would trip the per-example deadline)."""

from __future__ import annotations

import contextlib
import io
import random
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import main
from tests.conftest import kept_logging

DOCS = Path(__file__).parent.parent / "docs" / "rules.md"
WHOLE = DOCS.read_text().split("## The whole file")[1].split("```yaml\n")[1].split("```")[0]
ENV = {
    "MJ_BASE_URL": "http://127.0.0.1:9",
    "MJ_API_KEY": "k-0123456789",
    "SLACK_URL": "json://127.0.0.1:9",
    "PIPELINE_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "DISCORD_WEBHOOK": "https://discord.com/api/webhooks/1/abc",
    "SLACK_BOT_TOKEN": "xoxb-1",
    "MJ_PUSH_TOKEN": "t",
    "BRIDGE_TOKEN": "an-operator-token-of-length",
    "CLIENT_TOKEN": "a-client-token-of-some-length",
}

# Pieces YAML gives meaning to, and pieces the bridge's schema does.
TOKENS = [
    "\n", "\n  ", "\n    ", "\n- ", "  ", "\t", ": ", ":", "- ", "-", "[", "]", "{", "}", ",",
    "'", '"', "#", "&a ", "*a", "<<: ", "!!str ", "!!int ", "!!float ", "!!python/object:x ",
    "!x ", "|\n", ">\n", "? ", "%", "@", "`", "\\", "${MJ_API_KEY}", "${NOPE}", "${X:-5s}",
    "{{", "}}", "{%", "%}", "sources", "targets", "rules", "server", "name", "base_url", "to",
    "on", "when", "title", "body", "listen", "yes", "true", "0", "-1", ".inf", ".nan", "1e999",
    "5s", "30/min", "mj", "task.failed", "json://127.0.0.1:9", "http://127.0.0.1:9", "/x(/",
    "\x00", "\x85", "é", "\ufeff",
]  # fmt: skip

yamlish = st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=60).map("".join)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """The documented file with a few random edits: cut, insert, duplicate, re-indent."""
    lines = WHOLE.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        match draw(st.sampled_from(["cut", "insert", "duplicate", "indent", "dedent", "chars"])):
            case "cut":
                del lines[i]
            case "insert":
                lines.insert(i, draw(yamlish) + "\n")
            case "duplicate":
                lines.insert(i, lines[i])
            case "indent":
                lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
            case "dedent":
                lines[i] = lines[i][draw(st.integers(1, 3)) :]
            case "chars":
                line = lines[i]
                at = draw(st.integers(0, len(line)))
                lines[i] = line[:at] + draw(st.sampled_from(TOKENS)) + line[at + 1 :]
        if not lines:
            break
    return "".join(lines)


def run_check(text: str) -> tuple[int, str]:
    """`bridge check` in-process, through the CLI's own entry point."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out, err = io.StringIO(), io.StringIO()
        with kept_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", "-c", str(path)])
        return code, err.getvalue().replace(str(path), "rules.yaml")


def assert_plain_outcome(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = err.splitlines()
        assert lines, "exit 2 without a problem"
        assert all(line.startswith("rules.yaml:") for line in lines), err
    assert "k-0123456789" not in err  # values from ${VAR} stay hidden
    assert "xoxb-1" not in err


FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=30),  # only a hang trips this: a check takes milliseconds
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(yamlish)
def test_random_text(text: str) -> None:
    with _env():
        assert_plain_outcome(*run_check(text))


@FUZZ
@given(mutated())
def test_mutated_documented_file(text: str) -> None:
    with _env():
        assert_plain_outcome(*run_check(text))


@contextlib.contextmanager
def _env() -> contextlib.AbstractContextManager[None]:  # type: ignore[misc]
    import os

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_documented_file_passes() -> None:
    with _env():
        code, err = run_check(WHOLE)
    assert (code, err) == (0, "")


def test_a_few_mutations_as_a_subprocess(tmp_path: Path) -> None:
    """The same property through `python -m bridge check`, as a user runs it."""
    rng = random.Random(14)
    for n in range(3):
        lines = WHOLE.splitlines(keepends=True)
        for _ in range(3):
            i = rng.randrange(len(lines))
            lines[i] = rng.choice(["\t", "  ", "[", "{{ x }}: ", "*a ", "!!float y "]) + lines[i]
        path = tmp_path / f"rules{n}.yaml"
        path.write_text("".join(lines))
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**ENV, "PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert_plain_outcome(done.returncode, done.stderr.replace(str(path), "rules.yaml"))

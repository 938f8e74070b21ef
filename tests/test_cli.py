"""The `bridge` command's own messages and exit codes: usage mistakes get one clear line and
exit 2, a busy port one line and exit 1, and every option says what it does and its default."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import _parser, main
from bridge.store import Store

# main() sets up logging for the process, as `bridge` does: put it back after each test.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
async def db(tmp_path: Path) -> str:
    path = str(tmp_path / "bridge.db")
    async with await Store.open(path):
        pass
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "dlq replay needs dead letter IDs (see bridge dlq list), or --all"),
        (("abc", "--all"), "dlq replay takes dead letter IDs or --all, not both"),
    ],
    ids=["neither", "both"],
)
def test_dlq_replay_says_what_it_needs(
    db: str, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dlq", "replay", "--db", db, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    if not args:
        assert "not both" not in err


def _actions(parser: argparse.ArgumentParser, path: str = "bridge") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def test_every_option_says_what_it_does_and_its_default() -> None:
    missing = []
    for path, action in _actions(_parser()):
        name = action.option_strings[-1] if action.option_strings else action.dest
        has_default = bool(action.option_strings) and action.default not in (None, False, [])
        if not action.help:
            missing.append(f"{path} {name}: no help")
        elif has_default and "default" not in action.help:
            missing.append(f"{path} {name}: no default in its help")
    assert missing == []


def test_simulate_offers_every_flavour() -> None:
    [flavor] = [a for p, a in _actions(_parser()) if p == "bridge simulate" and a.dest == "flavor"]
    assert set(flavor.choices) == {"midjourney-proxy", "nz", "trueai", "new-api"}


def test_simulate_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "simulate", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == f"bridge: cannot listen on 127.0.0.1:{port}: address already in use\n"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("", "ok, but it defines no sources: the bridge would watch nothing (0 sources, 0 targets"),
        (
            "sources:\n  - {name: mj, base_url: 'http://127.0.0.1:9'}\n",
            "ok, but it defines no rules: events would reach no target (1 sources, 0 targets",
        ),
        (
            "sources:\n  - {name: mj, base_url: 'http://127.0.0.1:9'}\n"
            "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - {name: r, to: t}\n",
            "ok (1 sources, 1 targets, 1 rules)",
        ),
    ],
    ids=["empty", "no-rules", "complete"],
)
def test_check_says_plainly_when_the_file_does_nothing(
    tmp_path: Path, text: str, verdict: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    assert main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: {verdict}")


def test_explain_refuses_an_unknown_event_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text("targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - {name: r, to: t}\n")
    event = tmp_path / "event.json"
    event.write_text('{"type": "task.nope", "source": "bridge/mj", "subject": "1"}')
    assert main(["explain", "-c", str(config), str(event)]) == 2
    assert capsys.readouterr().err.startswith("bridge: 'task.nope' is not a known event type")

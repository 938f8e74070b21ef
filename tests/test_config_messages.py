"""docs/errors.md is the table of broken configs and the exact message a user sees for each: every
example there is run through `bridge check` as a user runs it, and its output must match the page
word for word (exit 2, FILE:LINE:COL, the place and the fix)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")  # these tests call main()

PAGE = Path(__file__).parent.parent / "docs" / "errors.md"
_CASE = re.compile(
    r"^## (?P<title>.+?)\n.*?```yaml\n(?P<yaml>.*?)```\n+```text\n(?P<out>.*?)```", re.S | re.M
)
_ENV = re.compile(r"^# with (\w+)=(\S+) in the environment$", re.M)


def _cases() -> list[object]:
    found = [
        pytest.param(m["yaml"], m["out"], id=m["title"]) for m in _CASE.finditer(PAGE.read_text())
    ]
    assert len(found) >= 25, "docs/errors.md lost its examples"
    return found


@pytest.mark.parametrize(("text", "output"), _cases())
def test_the_page_shows_what_check_says(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    output: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MJ_API_KEY", "MJ_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in _ENV.findall(text):
        monkeypatch.setenv(name, value)
    (tmp_path / "rules.yaml").write_text(text, encoding="utf-8")
    assert main(["check", "-c", "rules.yaml"]) == 2
    err = capsys.readouterr().err
    expected = output.removeprefix("$ bridge check\n")
    assert err == expected
    for _name, value in _ENV.findall(text):
        assert value not in err  # a value from ${VAR} is named, never shown


def test_every_message_names_a_place_and_a_path() -> None:
    for m in _CASE.finditer(PAGE.read_text()):
        for line in m["out"].splitlines()[1:]:
            assert re.match(r"^rules\.yaml:\d+:\d+: \S", line), line


def test_track_reads_only_the_sources_and_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge track` needs the source, not another target's `${PIPELINE_SECRET}`; and says
    exactly what happened the second time."""
    monkeypatch.delenv("PIPELINE_SECRET", raising=False)
    monkeypatch.delenv("OTHER_KEY", raising=False)
    path = tmp_path / "rules.yaml"
    path.write_text(
        "sources:\n  - {name: relay, base_url: 'http://127.0.0.1:9'}\n"
        "  - {name: other, base_url: 'http://127.0.0.1:9', api_key: '${OTHER_KEY}'}\n"
        "targets:\n  pipeline: {webhook: 'http://127.0.0.1:9/in', secret: '${PIPELINE_SECRET}'}\n"
        "rules:\n  - {name: r, to: pipeline}\n"
    )
    db = str(tmp_path / "bridge.db")
    assert main(["check", "-c", str(path)]) == 2  # the whole file still needs the secret
    assert "PIPELINE_SECRET" in capsys.readouterr().err
    assert main(["track", "-c", str(path), "--db", db, "relay", "t-1", "t-2"]) == 0
    assert capsys.readouterr().out.startswith("relay: 2 new task id(s) stored; the bridge")
    assert main(["track", "-c", str(path), "--db", db, "relay", "t-2", "t-3"]) == 0
    assert capsys.readouterr().out.startswith("relay: 1 new task id(s) stored; 1 already followed")
    assert main(["track", "-c", str(path), "--db", db, "relay", "t-1", "t-1"]) == 0
    assert (
        capsys.readouterr().out == "relay: already followed (1 task id(s) known); nothing stored\n"
    )


def test_send_test_reads_only_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge send-test hook` needs the hook, not the Slack token of another target; an unknown
    name still lists every target."""
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    path = tmp_path / "rules.yaml"
    path.write_text(
        "targets:\n  hook: {webhook: 'http://127.0.0.1:9/in', max_age: 1s, timeout: 1s}\n"
        "  team: {slack: '#mj', token: '${SLACK_BOT_TOKEN}'}\n"
    )
    assert main(["send-test", "-c", str(path), "nope"]) == 2
    assert "SLACK_BOT_TOKEN" in capsys.readouterr().err  # the whole file was read: all named
    code = main(["send-test", "-c", str(path), "hook"])
    captured = capsys.readouterr()
    assert "SLACK_BOT_TOKEN" not in captured.out + captured.err
    assert code == 1  # nothing listens on port 9: a delivery failure, not a config error

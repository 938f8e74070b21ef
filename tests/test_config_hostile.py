"""A hostile or careless rules.yaml: every file ends in FILE:LINE:COL problems (exit 2), never a
traceback, a hang or gigabytes; values from `${VAR}` never appear in a message; live reload
survives any file and applies the next good one."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import Config, ConfigError, ConfigWatcher, check, load_config
from bridge.config.document import LIBYAML, MAX_BYTES

pytestmark = pytest.mark.usefixtures("restore_logging")  # these tests call main()

BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)  # nine levels of nine aliases: 9**9 (387 million) values if expanded
DEEP = "a: " + "[" * 1000 + "]" * 1000 + "\n"
DEEP_BLOCK = "".join("  " * i + f"k{i}:\n" for i in range(1000)) + "  " * 1000 + "v: 1\n"
# Where reading stops: the 65th level with PyYAML's parser, libyaml's own limit (1,000) with it.
DEEP_COLUMN = 1003 if LIBYAML else 67
GOOD = "targets:\n  t: json://127.0.0.1:9\nrules:\n  - {name: one, on: task.failed, to: t}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# (file text, line, column, the message after "FILE:LINE:COL: ")
HOSTILE = [
    pytest.param(BOMB, 6, 1, "invalid YAML: more than 100,000 values once aliases are expanded "
                 "(an alias that repeats itself? write fewer * aliases)", id="alias-bomb"),
    pytest.param(DEEP, 1, DEEP_COLUMN, "invalid YAML: nested more than 64 levels deep (a rules "
                 "file needs fewer than 10)", id="deep-flow"),
    pytest.param(DEEP_BLOCK, 64, 127, "invalid YAML: nested more than 64 levels deep (a rules "
                 "file needs fewer than 10)", id="deep-block"),
    pytest.param("a: &a [*a]\n", 1, 1, "invalid YAML: an alias inside its own anchor repeats "
                 "forever (point * at an anchor outside it)", id="alias-cycle"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    timeout: !!float y\n",
                 4, 14, "sources[0].timeout: cannot read this value as !!float (write a number, "
                 "or put text in quotes)", id="tag-float"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    poll_interval: !!int x\n",
                 4, 20, "sources[0].poll_interval: cannot read this value as !!int (write a "
                 "whole number, or put text in quotes)", id="tag-int"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    stall_after: !!timestamp x\n",
                 4, 18, "sources[0].stall_after: the tag !!timestamp is not supported: this file "
                 "holds plain values (remove the tag)", id="tag-timestamp"),
    pytest.param("rules: !!python/object/apply:os.system [echo hi]\n", 1, 8, "rules: the tag "
                 "!!python/object/apply:os.system is not supported: this file holds plain values "
                 "(remove the tag)", id="tag-python"),
    pytest.param("server: !mine {listen: ':1'}\n", 1, 9, "server: the tag !mine is not "
                 "supported: this file holds plain values (remove the tag)", id="tag-local"),
    pytest.param("retention: " + "9" * 5000 + "\n", 1, 12, "retention: cannot read this value as "
                 "!!int (write a whole number, or put text in quotes)", id="number-too-long"),
    pytest.param("rules:\n  - name: r\n    to: t\x01\n", 3, 10, "invalid YAML: the control "
                 "character U+0001 cannot appear in a YAML file (delete it; write \\t or \\n "
                 "inside \"double quotes\" if you meant one)", id="reader-error-position"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    poll_interval: 0\n", 4, 20,
                 "sources[0].poll_interval: must be more than 0, such as 250ms, 5s or 2m",
                 id="poll-interval-zero"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    timeout: 0s\n", 4, 14,
                 "sources[0].timeout: must be more than 0, such as 250ms, 5s or 2m",
                 id="timeout-zero"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    poll_interval: -1\n", 4, 20,
                 "sources[0].poll_interval: a duration cannot be negative (write one such as "
                 "250ms, 5s or 2m)", id="poll-interval-negative"),
    pytest.param("sources:\n  - name: mj\n    base_url: http://x\n    stall_after: .nan\n", 4, 18,
                 "sources[0].stall_after: a duration must be finite (write one such as 250ms, 5s "
                 "or 2m)", id="nan"),
    pytest.param("targets:\n  h: {webhook: 'http://x', timeout: 0, max_age: 0}\n", 2, 37,
                 "targets.h.timeout: must be more than 0, such as 250ms, 5s or 2m",
                 id="target-timeout-zero"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "column", "message"), HOSTILE)
def test_hostile_file_is_a_plain_problem(
    tmp_path: Path, text: str, line: int, column: int, message: str
) -> None:
    path = write(tmp_path, text)
    problems = check(path, {})
    assert str(problems[0]) == f"{path}:{line}:{column}: {message}", [str(p) for p in problems]


def test_a_byte_that_is_not_utf8_is_pointed_at(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"rules:\n  - name: caf\xe9\n")
    assert [str(p) for p in check(path, {})] == [
        f"{path}:2:14: this byte is not UTF-8 text (save the file as UTF-8)"
    ]


def test_a_file_too_large_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "# padding\n" * (MAX_BYTES // 10 + 1))
    [problem] = check(path, {})
    assert (problem.line, problem.column) == (1, 1)
    assert problem.message == "the file is larger than 1024 KiB; a rules file needs far less"


@pytest.mark.parametrize("text", [BOMB, DEEP, DEEP_BLOCK], ids=["bomb", "deep", "deep-block"])
def test_bridge_check_exits_2_in_a_subprocess(tmp_path: Path, text: str) -> None:
    """As a user runs it: exit 2, problems on stderr, no traceback, memory stays small."""
    path = write(tmp_path, text)
    # The peak of this child alone, as the kernel counts it for the child's own memory (VmHWM),
    # written by the child as it exits. Neither RUSAGE_CHILDREN (the largest child pytest ever
    # waited for) nor wait4's ru_maxrss will do: both carry the peak of pytest itself, which the
    # child inherits at fork (hundreds of MB late in a full run).
    hwm = tmp_path / "hwm"
    child_code = (
        "import atexit, pathlib, runpy, sys; status = pathlib.Path('/proc/self/status'); "
        f"atexit.register(lambda: pathlib.Path({str(hwm)!r}).write_text(status.read_text())); "
        "sys.argv[0] = 'bridge'; runpy.run_module('bridge', run_name='__main__')"
    )
    with (tmp_path / "stderr").open("w+") as err:
        child = subprocess.run(
            [sys.executable, "-c", child_code, "check", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=120,
        )
        err.seek(0)
        stderr = err.read()
    assert child.returncode == 2, stderr
    assert stderr.startswith(f"{path}:"), stderr
    assert "Traceback" not in stderr
    status = hwm.read_text().splitlines()
    peak_kib = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    assert peak_kib < 400 * 1024  # the bomb expanded would take gigabytes


SECRET = "sk-live-7Hq2f9Zx0123"


@pytest.mark.parametrize(
    "text",
    [
        "sources:\n  - name: mj\n    base_url: http://x\n    timeout: ${MJ_API_KEY}\n",
        "targets:\n  h: {webhook: 'http://x', rate_limit: '${MJ_API_KEY}'}\n",
        "sources:\n  - name: mj\n    base_url: http://x\n    backfill: ${MJ_API_KEY}\n",
        "targets: {t: 'json://x'}\nrules:\n  - {name: r, to: '${MJ_API_KEY}'}\n",
        "targets: {t: 'json://x'}\nrules:\n  - {name: r, to: t, on: 'x-${MJ_API_KEY}'}\n",
        "sources:\n  - {name: mj, base_url: 'http://x'}\ntargets: {t: 'json://x'}\n"
        "rules:\n  - {name: r, to: t, when: {source: '${MJ_API_KEY}'}}\n",
        "server: {listen: '${MJ_API_KEY}'}\n",
        "sources:\n  - name: '${MJ_API_KEY}'\n    base_url: http://x\n",
    ],
    ids=["duration", "rate", "bool", "target", "event", "source", "listen", "name"],
)
def test_values_from_variables_are_named_not_shown(tmp_path: Path, text: str) -> None:
    problems = check(write(tmp_path, text), {"MJ_API_KEY": SECRET})
    assert problems
    shown = "\n".join(str(p) for p in problems)
    assert SECRET not in shown
    assert "sk-live" not in shown
    assert "${MJ_API_KEY}" in shown, shown


def test_the_watcher_survives_any_file_and_applies_the_next_good_one(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    configs: list[Config] = []
    errors: list[ConfigError] = []
    watcher = ConfigWatcher(path, configs.append, errors.append, env={})
    for text in (BOMB, DEEP_BLOCK, "a: !!float y\n", "\x00", GOOD.replace("one", "two")):
        write(tmp_path, text)
        watcher.check_now()
    assert len(errors) == 4
    assert all(str(e).startswith(f"{path}:") for e in errors)
    assert [[r.name for r in c.rules] for c in configs] == [["two"]]


async def test_the_polling_watcher_keeps_watching_after_a_deep_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    changed = asyncio.Event()
    configs: list[Config] = []
    errors: list[ConfigError] = []

    def on_change(config: Config) -> None:
        configs.append(config)
        changed.set()

    def on_error(error: ConfigError) -> None:
        errors.append(error)
        changed.set()

    watcher = ConfigWatcher(path, on_change, on_error, interval=0.02, env={})
    task = asyncio.create_task(watcher.run())
    try:
        write(tmp_path, DEEP)
        await asyncio.wait_for(changed.wait(), timeout=30)
        changed.clear()
        write(tmp_path, GOOD.replace("one", "three"))
        await asyncio.wait_for(changed.wait(), timeout=30)
        assert len(errors) == 1
        assert [[r.name for r in c.rules] for c in configs] == [["three"]]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_cli_check_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, DEEP)
    assert main(["check", "-c", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:1:{DEEP_COLUMN}: invalid YAML: nested")
    assert load_config(write(tmp_path, GOOD), {}).rules[0].name == "one"


def test_server_timeouts_are_refused_at_their_key(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  listen: 127.0.0.1:1\n  header_timeout: 0s\n")
    assert [str(p) for p in check(path, {})] == [
        f"{path}:3:19: server.header_timeout: must be more than 0, such as 250ms, 5s or 2m"
    ]

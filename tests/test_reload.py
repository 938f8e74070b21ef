"""Live reload: a changed file is validated whole before it is swapped in; a bad one is refused
with its file:line problems and the old config keeps running."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from bridge.config import Config, ConfigError, ConfigWatcher, load_config

GOOD = "targets:\n  t: json://127.0.0.1:9\nrules:\n  - {name: one, on: task.failed, to: t}\n"
GOOD2 = GOOD.replace("name: one", "name: two")
BAD = GOOD.replace("to: t", "to: nowhere")


class Recorder:
    def __init__(self) -> None:
        self.configs: list[Config] = []
        self.errors: list[ConfigError] = []
        self.seen = asyncio.Event()

    def changed(self, config: Config) -> None:
        self.configs.append(config)
        self.seen.set()

    def failed(self, error: ConfigError) -> None:
        self.errors.append(error)
        self.seen.set()


def replace(path: Path, text: str) -> None:
    """Write the way editors do (a new file renamed over the old), so a poll never reads half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def names(config: Config) -> list[str]:
    return [r.name for r in config.rules]


def test_good_bad_and_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    running = load_config(path, {})
    seen = Recorder()
    watcher = ConfigWatcher(path, seen.changed, seen.failed, env={})

    assert watcher.check_now() is None  # unchanged: nothing happens
    assert (seen.configs, seen.errors) == ([], [])

    path.write_text(BAD)
    assert watcher.check_now() is None
    assert seen.configs == []  # refused: the running config stays
    assert names(running) == ["one"]
    assert [str(p) for p in seen.errors[0].problems] == [
        f"{path}:4:38: rules[0].to: unknown target 'nowhere' (targets: t)"
    ]
    assert watcher.check_now() is None  # the same bad content is reported once
    assert len(seen.errors) == 1

    path.write_text(GOOD2)
    new = watcher.check_now()
    assert new is not None
    assert names(new) == ["two"]
    assert [names(c) for c in seen.configs] == [["two"]]


def test_sighup_reloads_even_when_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    seen = Recorder()
    watcher = ConfigWatcher(path, seen.changed, seen.failed, env={})
    assert watcher.reload_now() is not None
    assert [names(c) for c in seen.configs] == [["one"]]


def test_a_deleted_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    seen = Recorder()
    watcher = ConfigWatcher(path, seen.changed, seen.failed, env={})
    path.unlink()
    assert watcher.check_now() is None
    assert "cannot read the file" in str(seen.errors[0])


async def test_polling_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    seen = Recorder()
    watcher = ConfigWatcher(path, seen.changed, seen.failed, interval=0.02, env={})
    task = asyncio.create_task(watcher.run())
    try:
        replace(path, BAD)
        await asyncio.wait_for(seen.seen.wait(), timeout=5)
        assert len(seen.errors) == 1
        assert seen.configs == []
        seen.seen.clear()
        replace(path, GOOD2)
        await asyncio.wait_for(seen.seen.wait(), timeout=5)
        assert [names(c) for c in seen.configs] == [["two"]]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sighup_reloads_from_the_polling_loop(tmp_path: Path) -> None:
    """SIGHUP asks the running watcher; the file is read off the loop, changed or not."""
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    seen = Recorder()
    watcher = ConfigWatcher(path, seen.changed, seen.failed, interval=3600, env={})
    task = asyncio.create_task(watcher.run())
    try:
        watcher.request_reload()
        await asyncio.wait_for(seen.seen.wait(), timeout=10)
        assert [names(c) for c in seen.configs] == [["one"]]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

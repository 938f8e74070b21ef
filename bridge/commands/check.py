"""`bridge check`: the verdict on a rules file that loaded (one that did not gets FILE:LINE:COL
problems from the loader and exit 2, in cli.py). The argument parsing lives in cli.py."""

from __future__ import annotations

from bridge.config import Config


def verdict(path: str, config: Config) -> str:
    """`ok` with what the file defines, or what a valid file still lacks to do anything."""
    counts = (
        f"{len(config.sources)} sources, {len(config.targets)} targets, {len(config.rules)} rules"
    )
    if not config.sources:
        return f"{path}: ok, but it defines no sources: the bridge would watch nothing ({counts})"
    if not config.rules:
        return f"{path}: ok, but it defines no rules: events would reach no target ({counts})"
    return f"{path}: ok ({counts})"

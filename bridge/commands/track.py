"""`bridge track SOURCE ID...` hands task ids to the running bridge (POST /track) or, when none
answers, writes them to the store for its next poll; `bridge hash-password` makes a password hash
for `server.auth.users`. The argument parsing lives in cli.py.
"""

from __future__ import annotations

import getpass
import sys
import time

import aiohttp

from bridge.config import Config, SourceConfig, hash_password
from bridge.models import TaskState
from bridge.store import Store

__all__ = ["hash_password_command", "track_command"]


# -- bridge track SOURCE ID... --------------------------------------------------------------------


async def _via_server(
    config: Config, source: SourceConfig, ids: list[str]
) -> tuple[int, int] | None:
    """Hand the ids to a running bridge: (newly followed, already followed), or None when none
    answers (then the store is written)."""
    if config.server is None or not source.push_token:
        return None
    listen = config.server.listen
    host = "127.0.0.1" if listen.everywhere or listen.host is None else listen.host
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{listen.port}/track/{source.name}"
    headers = {"Authorization": f"Bearer {source.push_token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.post(url, json={"ids": ids}, headers=headers) as response,
        ):
            data = await response.json(content_type=None)
            if response.status != 200 or not isinstance(data, dict):
                return None
            return int(data.get("tracked", 0)), int(data.get("known", 0))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


async def track_command(config: Config, db: str, source: str, ids: list[str]) -> int:
    """`bridge track SOURCE ID...`: follow these task ids. A running bridge (server.listen and the
    source's push_token) takes them at once; otherwise they are written to the store, where the
    bridge polling the source finds them at its next poll (or start). Exit code: 0 ok, 2 unknown
    source or no ids."""
    found = next((s for s in config.sources if s.name == source), None)
    if found is None:
        names = ", ".join(s.name for s in config.sources) or "none"
        print(f"bridge track: unknown source {source!r} (sources: {names})", file=sys.stderr)
        return 2
    wanted = list(dict.fromkeys(i.strip() for i in ids if i.strip()))
    if not wanted:
        print("bridge track: give at least one task id", file=sys.stderr)
        return 2
    live = await _via_server(config, found, wanted)
    if live is not None:
        added, known = live
        if not added:
            print(f"{source}: already followed by the running bridge ({known} task id(s)); "
                  "nothing changed")  # fmt: skip
        else:
            also = f"; {known} already followed" if known else ""
            print(f"{source}: the running bridge now follows {added} new task id(s){also}")
        return 0
    store = await Store.open(db)
    try:
        known_ids = await store.load_tasks(source)
        now = time.time()
        new = {tid: TaskState("", -1, now) for tid in wanted if tid not in known_ids}
        if new:
            await store.commit(source, new, [], [], seen=False)
    finally:
        await store.close()
    if not new:
        print(f"{source}: already followed ({len(wanted)} task id(s) known); nothing stored")
        return 0
    also = f"; {len(wanted) - len(new)} already followed" if len(new) < len(wanted) else ""
    print(
        f"{source}: {len(new)} new task id(s) stored{also}; the bridge polling this source "
        "follows them from its next poll"
    )
    return 0


def hash_password_command() -> int:
    """`bridge hash-password`: the password from the terminal (twice) or one line of stdin."""
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("bridge hash-password: the two did not match", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("bridge hash-password: use at least 8 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0

"""SIGKILL `bridge run` in the middle of a burst of 2,000 events into each broker, then restart it:
every event the bridge recorded reaches the broker (0 lost). JetStream holds each event exactly
once (its duplicate window drops the re-sends under the same Nats-Msg-Id); the other brokers may
hold a repeat, but only of an event that had already arrived before the kill (the crash window),
and the test reports how many."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bridge.simulator import Simulator
from tests.brokers import KINDS, Sink

BURST = 2000
KILL_AFTER = 500  # events in the broker when the bridge is killed


async def start(config: Path, db: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "run",
        "-c",
        str(config),
        "--db",
        str(db),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def pending(db: Path) -> tuple[set[str], int]:
    """(ids of every event recorded, deliveries not sent yet)."""
    with sqlite3.connect(db) as conn:
        recorded = {row[0] for row in conn.execute("SELECT id FROM events")}
        (waiting,) = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'inflight')"
        ).fetchone()
    return recorded, waiting


@pytest.mark.parametrize("kind", KINDS)
async def test_sigkill_during_a_burst_loses_nothing(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, db = tmp_path / "rules.yaml", tmp_path / "bridge.db"
    async with Simulator("midjourney-proxy", api_key="k", seed=5) as sim, Sink(kind) as sink:
        sim.seed_tasks(BURST)
        config.write_text(
            yaml.safe_dump(
                {
                    "sources": [
                        {
                            "name": "mj",
                            "base_url": sim.url,
                            "api_key": "k",
                            "auth": "mj-api-secret",
                            "poll_interval": "200ms",
                            "backfill": True,
                            "mode": "list",
                        }
                    ],
                    # 300/s after a first 300: the kill lands in the burst on any machine.
                    "targets": {
                        "t": sink.target(concurrency=8, max_attempts=1000, rate_limit="300/s")
                    },
                    "rules": [{"name": "all", "on": "*", "to": "t"}],
                }
            )
        )
        proc = await start(config, db)
        try:
            await sink.wait_for(KILL_AFTER, within=120)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        await asyncio.sleep(0.5)  # what the broker accepted before the kill reaches the reader
        before = Counter(r.id for r in await sink.read())
        assert len(before) < BURST, "the burst was over before the kill"

        proc = await start(config, db)
        try:
            async with asyncio.timeout(180):
                while True:
                    recorded, waiting = pending(db)
                    got = {r.id for r in await sink.read()}
                    if len(recorded) >= BURST and not waiting and recorded <= got:
                        break
                    await asyncio.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        received = Counter(r.id for r in await sink.read())

    lost = recorded - set(received)
    repeats = {i: n - 1 for i, n in received.items() if n > 1}
    with capsys.disabled():
        print(
            f"\n{kind}: {len(recorded)} events, {len(before)} in the broker at the kill, "
            f"{sum(received.values())} messages after the restart: {len(lost)} lost, "
            f"{sum(repeats.values())} repeats"
        )
    assert not lost
    assert set(received) <= recorded, "a message that is no event of the bridge"
    if kind == "nats":
        assert not repeats, "JetStream holds each event once"
    else:
        assert set(repeats) <= set(before), "a repeat of an event not sent before the crash"

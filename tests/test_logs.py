"""What an operator reads: one start-up line naming sources, targets, rules and the listen address,
text or JSON lines, and never a secret, even where the config puts one in a URL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson

from bridge.simulator import Simulator

SECRETS = ("S3CRETPASS", "K3YWRONGKEY", "T0KENINQUERY", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


async def run_bridge(tmp_path: Path, sim: Simulator, *flags: str) -> str:
    host_port = sim.url.removeprefix("http://")
    config = tmp_path / "rules.yaml"
    config.write_text(
        f"""
sources:
  - name: mj
    base_url: http://admin:S3CRETPASS@{host_port}
    api_key: K3YWRONGKEY
    auth: mj-api-secret
    poll_interval: 100ms
targets:
  hook:
    webhook: http://127.0.0.1:9/events?token=T0KENINQUERY
    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
rules:
  - name: all
    on: "*"
    to: hook
server:
  listen: 127.0.0.1:0
"""
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *flags,
        "run",
        "-c",
        str(config),
        "--db",
        str(tmp_path / "b.db"),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            # The key is wrong: three failed polls make a source.down, whose delivery fails too.
            while not any("source down" in line for line in lines):
                lines.append((await proc.stderr.readline()).decode())
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    return "".join(lines) + (rest or b"").decode()


async def test_text_logs_name_everything_and_hide_secrets(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="right-key") as sim:
        out = await run_bridge(tmp_path, sim)
    start = next(line for line in out.splitlines() if "running:" in line)
    for part in ("sources mj", "targets hook", "rules all", "listen 127.0.0.1:0"):
        assert part in start
    assert "auth_failed" in out
    assert "stopped cleanly" in out
    for secret in SECRETS:
        assert secret not in out


async def test_json_logs_are_one_object_a_line(tmp_path: Path) -> None:
    async with Simulator("midjourney-proxy", api_key="right-key") as sim:
        out = await run_bridge(tmp_path, sim, "--log-format", "json")
    records = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["level"] == "error" and "source down" in r["message"] for r in records)
    for secret in SECRETS:
        assert secret not in out

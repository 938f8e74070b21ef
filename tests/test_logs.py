"""What an operator reads: one start-up line naming sources, targets, rules and the listen address,
text or JSON lines, and never a secret, even where the config puts one in a URL."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from bridge.config import Config
from bridge.errors import Redactor
from bridge.logs import FIELDS, JsonFormatter, RedactingFilter, TextFormatter
from bridge.simulator import Simulator

SECRETS = ("S3CRETPASS", "K3YWRONGKEY", "T0KENINQUERY", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def _source_down(lines: list[str]) -> bool:
    return any("source down" in line for line in lines)


async def run_bridge(
    tmp_path: Path,
    sim: Simulator,
    *flags: str,
    until: Callable[[list[str]], bool] = _source_down,
) -> str:
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
            while not until(lines):
                line = (await proc.stderr.readline()).decode()
                assert line, "the bridge exited early:\n" + "".join(lines)
                lines.append(line)
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


RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _records(out: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def _retries(lines: list[str]) -> int:
    return sum('"delivery_id"' in line and "retry" in line for line in lines)


async def test_json_logs_carry_a_utc_millisecond_time_and_the_fields(tmp_path: Path) -> None:
    # -v shows the bridge's debug lines: wait for the source.down delivery's second retry.
    async with Simulator("midjourney-proxy", api_key="right-key") as sim:
        out = await run_bridge(
            tmp_path, sim, "--log-format", "json", "-v", until=lambda ls: _retries(ls) >= 2
        )
    records = _records(out)
    assert all(RFC3339_MS_UTC.match(str(r["time"])) for r in records), records[0]["time"]
    down = next(r for r in records if "source down" in str(r["message"]))
    assert down["source"] == "mj"
    emitted = next(r for r in records if r.get("event_type") == "source.down" and "task" in r)
    assert emitted["source"] == "mj"
    retries = [r for r in records if r.get("target") == "hook" and "retry" in str(r["message"])]
    assert len(retries) >= 2
    first = retries[0]
    assert first["event_type"] == "source.down"
    assert first["attempt"] == 1
    assert str(first["delivery_id"]).endswith(":hook")
    # A target that stays down is one warning, then debug lines: not an info line per retry.
    assert all(r["level"] == "debug" for r in retries)
    failing = [r for r in records if r.get("target") == "hook" and r["level"] == "warning"]
    assert len(failing) == 1
    assert "the target is failing" in str(failing[0]["message"])
    assert set(FIELDS) >= {k for r in records for k in r} - {"time", "level", "logger", "message"}
    for secret in SECRETS:
        assert secret not in out


async def test_library_debug_lines_need_a_second_v(tmp_path: Path) -> None:
    # Two bridges, each with its own database: the second must see its own source.down (the
    # outage a database keeps carries over to the next start, so it would log none).
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with Simulator("midjourney-proxy", api_key="right-key") as sim:
        one = _records(await run_bridge(tmp_path / "one", sim, "--log-format", "json", "-v"))
    async with Simulator("midjourney-proxy", api_key="right-key") as sim:
        two = _records(await run_bridge(tmp_path / "two", sim, "--log-format", "json", "-vv"))
    assert any(r["level"] == "debug" and str(r["logger"]).startswith("bridge") for r in one)
    assert not [r for r in one if not str(r["logger"]).startswith("bridge")]
    assert any(str(r["logger"]).startswith("aiosqlite") for r in two)


def test_a_text_entry_is_one_line_even_with_a_traceback() -> None:
    record = logging.LogRecord(
        "bridge.x", logging.ERROR, __file__, 1, "boom\nsecond line", (), None
    )
    try:
        raise ValueError("inner")
    except ValueError:
        record.exc_info = sys.exc_info()
    RedactingFilter(Redactor()).filter(record)
    line = TextFormatter().format(record)
    assert "\n" not in line.replace("\\n", "")
    assert "Traceback" in line
    assert "ValueError: inner" in line
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} ERROR bridge.x: boom", line)


def test_json_fields_are_redacted_too() -> None:
    record = logging.LogRecord("bridge.x", logging.INFO, __file__, 1, "sent", (), None)
    record.target = "hook"
    record.task = "tok-S3CRETPASS"
    RedactingFilter(Redactor(["S3CRETPASS"])).filter(record)
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["target"] == "hook"
    assert "S3CRETPASS" not in entry["task"]


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        (
            "urllib3.connectionpool",
            'http://127.0.0.1:80 "POST /api/webhooks/1/T0KEN-xyz HTTP/1.1" 204',
        ),
        ("apprise", "JSON POST URL: http://127.0.0.1:9/hooks/T0KEN-xyz?sig=T0KEN-xyz (cert: 1)"),
        ("aiohttp.client", "GET https://cdn.example/attachments/1/2/T0KEN-xyz.png"),
    ],
    ids=["urllib3", "apprise", "aiohttp"],
)
def test_libraries_never_print_request_paths(logger: str, message: str) -> None:
    """At -vv the libraries log the URLs they call; a webhook URL's path is a secret."""
    record = logging.LogRecord(logger, logging.DEBUG, __file__, 1, message, None, None)
    assert RedactingFilter(Redactor()).filter(record)
    assert "T0KEN-xyz" not in record.getMessage()
    assert "127.0.0.1" in record.getMessage() or "cdn.example" in record.getMessage()


def test_webhook_and_apprise_urls_are_secrets_whole_and_in_part() -> None:
    config = Config.model_validate(
        {
            "targets": {
                "hook": {"webhook": "https://hooks.example/in/T0KEN-abcdef?key=K3Y-abcdef"},
                "chat": "json://chat.example/post/T0KEN-ghijkl",
            }
        }
    )
    redact = Redactor(config.secrets())
    for leaked in (
        "error POSTing https://hooks.example/in/T0KEN-abcdef?key=K3Y-abcdef",
        "POST /in/T0KEN-abcdef?key=K3Y-abcdef failed",  # as a library prints it, without the host
        "http://chat.example/post/T0KEN-ghijkl said 500",
    ):
        shown = redact(leaked)
        assert "T0KEN" not in shown
        assert "K3Y" not in shown

"""/metrics of a real running bridge as Prometheus reads it: `promtool check metrics` finds nothing
to complain about, and the series an operator builds alerts and dashboards on are there."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge import __version__
from bridge.config import Config
from bridge.models import utcnow
from bridge.simulator import Simulator
from tests.conftest_browser import PUSH_TOKEN, SIM_KEY, Harness, eventually, running_bridge
from tests.receiver import Receiver


def promtool() -> str:
    """Debian's prometheus package ships it; `make test` installs it when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; make test does)")
    return path


@pytest.fixture
async def bridge(rx: Receiver, tmp_path: Path) -> AsyncIterator[tuple[Harness, Simulator]]:
    async with Simulator(flavor="midjourney-proxy", api_key=SIM_KEY) as sim:
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": sim.url,
                        "api_key": SIM_KEY,
                        "auth": "mj-api-secret",
                        "poll_interval": "30s",
                        "push_token": PUSH_TOKEN,
                    }
                ],
                "targets": {
                    "hook": {"webhook": f"{rx.url}/hook"},
                    # Nothing listens on the discard port: every attempt fails.
                    "gone": {"webhook": "http://127.0.0.1:9/hook"},
                },
                "rules": [{"name": "all", "on": ["task.*"], "to": ["hook", "gone"]}],
                "server": {"listen": "127.0.0.1:0"},
            }
        )
        async with running_bridge(config, tmp_path / "b.db") as harness:
            yield harness, sim


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_pass_promtool_and_carry_latency_state_and_build(
    bridge: tuple[Harness, Simulator], rx: Receiver
) -> None:
    harness, sim = bridge
    task = sim.task(sim.add_task("metrics please"))
    started = time.time()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{harness.url}/hooks/mj", data=orjson.dumps(task), params={"token": PUSH_TOKEN}
        ) as resp:
            assert resp.status == 200
        await rx.wait_for(1)
        counts = harness.running.deliverer.counts
        await eventually(lambda: counts[("hook", "sent")] >= 1 and counts[("gone", "retry")] >= 1)
        async with http.get(f"{harness.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()

    check = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    got = samples(text)
    assert got[("process_cpu_seconds_total", ())] > 0
    assert got[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_info" for name, _ in got)
    build = [labels for name, labels in got if name == "bridge_build_info"]
    assert dict(build[0])["version"] == __version__
    # Latency: one observation for the delivered event, none yet for the target that is down.
    assert got[("bridge_delivery_latency_seconds_count", (("target", "hook"),))] >= 1
    assert ("bridge_delivery_latency_seconds_count", (("target", "gone"),)) not in got
    assert got[("bridge_delivery_latency_seconds_sum", (("target", "hook"),))] < 60
    # Last success times are Unix times of this test's run.
    hook_ok = got[("bridge_target_last_success_timestamp_seconds", (("target", "hook"),))]
    assert started - 1 <= hook_ok <= time.time()
    mj_ok = got[("bridge_source_last_success_timestamp_seconds", (("source", "mj"),))]
    assert started - 60 <= mj_ok <= time.time()
    # The target state: the failing one is down, the other up.
    assert got[("bridge_target_up", (("target", "hook"),))] == 1
    assert got[("bridge_target_up", (("target", "gone"),))] == 0


def test_the_grafana_dashboard_asks_only_for_series_the_bridge_serves() -> None:
    """docs/grafana/mj-bridge.json (written by docs/dashboard.py) names no metric /metrics lacks."""
    from bridge.metrics import Metrics
    from bridge.models import Event

    metrics = Metrics()
    metrics.event(Event(id="e", type="task.succeeded", source="mj", subject="1", time=utcnow()))
    metrics.delivery("hook", "sent")
    metrics.sent("hook", [0.2])
    metrics.poll("mj", 0.01, True)
    metrics.set_outbox({"hook": 1}, {"hook": 0}, ["hook"])
    metrics.set_targets({"hook": SimpleNamespace(up=True)})
    served = {s.name for f in text_string_to_metric_families(metrics.render().decode())
              for s in f.samples}  # fmt: skip

    doc = orjson.loads((Path(__file__).parent.parent / "docs/grafana/mj-bridge.json").read_bytes())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    asked = {n for e in exprs for n in re.findall(r"\b(?:bridge|process|python)_[a-z_]+", e)}
    assert len(doc["panels"]) >= 8
    assert asked, exprs
    assert asked <= served, asked - served

"""The Grafana dashboard (docs/grafana/mj-bridge.json) and its picture (docs/images/dashboard.png).

Both come from PANELS below, so they cannot drift apart. The picture is real data: a bridge runs
here against the simulator and two local receivers (one goes down for a while, then recovers),
/metrics is scraped every 2 seconds, each panel's PromQL is evaluated over the samples by the
Python beside it, and the result is drawn as SVG and screenshotted in headless Chromium (Grafana
itself is not installable here).

    .venv/bin/python docs/dashboard.py [SECONDS]
"""

from __future__ import annotations

import asyncio
import html
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import Config  # noqa: E402
from bridge.simulator import Simulator  # noqa: E402
from tests.conftest_browser import SIM_KEY, running_bridge  # noqa: E402
from tests.receiver import Receiver, Reply  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
JSON_PATH = ROOT / "docs" / "grafana" / "mj-bridge.json"
PNG_PATH = ROOT / "docs" / "images" / "dashboard.png"
STEP = 2.0  # seconds between scrapes
WINDOW = 10.0  # the [range] of rates and quantiles in the picture (the JSON uses $__rate_interval)

Labels = tuple[tuple[str, str], ...]
Scrape = tuple[float, dict[tuple[str, Labels], float]]
Series = dict[str, list[tuple[float, float]]]


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend format)
    unit: str
    evaluate: Callable[[list[Scrape]], Series]
    kind: str = "timeseries"
    width: int = 12  # of Grafana's 24 columns


# -- evaluating the panels over scraped samples ---------------------------------------------------


def _by(scrapes: list[Scrape], name: str, label: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for at, samples in scrapes:
        for (metric, labels), value in samples.items():
            if metric == name:
                out[dict(labels).get(label, "")].append((at, value))
    return out


def _sum_by(scrapes: list[Scrape], name: str, keep: Callable[[dict[str, str]], str | None]):
    """Per scrape, the sum of `name`'s samples grouped by keep(labels) (None: left out)."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for at, samples in scrapes:
        sums: dict[str, float] = defaultdict(float)
        for (metric, labels), value in samples.items():
            key = keep(dict(labels)) if metric == name else None
            if key is not None:
                sums[key] += value
        for key, value in sums.items():
            out[key].append((at, value))
    return out


def _rate(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for i, (at, value) in enumerate(points):
        old = [p for p in points[:i] if at - p[0] >= WINDOW - 0.01]
        if old:
            then, before = old[-1]
            out.append((at, max(0.0, value - before) / (at - then)))
    return out


def events_rate(scrapes: list[Scrape]) -> Series:
    sums = _sum_by(scrapes, "bridge_events_total", lambda labels: labels["type"])
    return {k: _rate(v) for k, v in sorted(sums.items())}


def deliveries_rate(scrapes: list[Scrape]) -> Series:
    sums = _sum_by(
        scrapes, "bridge_deliveries_total", lambda labels: f"{labels['target']} {labels['outcome']}"
    )
    return {k: _rate(v) for k, v in sorted(sums.items())}


def latency(scrapes: list[Scrape]) -> Series:
    """histogram_quantile(q, sum by (target, le) (rate(bucket[w]))), for q = 0.5 and 0.95."""
    buckets = _sum_by(
        scrapes,
        "bridge_delivery_latency_seconds_bucket",
        lambda labels: f"{labels['target']}|{labels['le']}",
    )
    rates: dict[str, dict[float, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for key, points in buckets.items():
        target, le = key.split("|")
        for at, value in _rate(points):
            rates[target][at][float(le)] = value
    out: Series = {}
    for target, by_time in sorted(rates.items()):
        for q in (0.5, 0.95):
            line = []
            for at, cum in sorted(by_time.items()):
                bounds = sorted(cum)
                total = cum[bounds[-1]]
                if total <= 0:
                    continue
                rank, lower, below = q * total, 0.0, 0.0
                for upper in bounds:
                    if cum[upper] >= rank:
                        if upper == float("inf"):
                            value = lower
                        else:
                            share = (rank - below) / max(cum[upper] - below, 1e-12)
                            value = lower + (upper - lower) * share
                        line.append((at, value))
                        break
                    lower, below = upper, cum[upper]
            out[f"{target} p{int(q * 100)}"] = line
    return out


def gauge(name: str, label: str) -> Callable[[list[Scrape]], Series]:
    def evaluate(scrapes: list[Scrape]) -> Series:
        return dict(sorted(_by(scrapes, name, label).items()))

    return evaluate


def since(name: str, label: str) -> Callable[[list[Scrape]], Series]:
    def evaluate(scrapes: list[Scrape]) -> Series:
        return {
            k: [(at, at - v) for at, v in points]
            for k, points in sorted(_by(scrapes, name, label).items())
        }

    return evaluate


def memory(scrapes: list[Scrape]) -> Series:
    return {"resident": [(at, s[("process_resident_memory_bytes", ())]) for at, s in scrapes]}


PANELS = [
    Panel(
        "Sources up",
        [("bridge_source_up", "{{source}}")],
        "none",
        gauge("bridge_source_up", "source"),
        kind="state",
        width=6,
    ),
    Panel(
        "Targets up",
        [("bridge_target_up", "{{target}}")],
        "none",
        gauge("bridge_target_up", "target"),
        kind="state",
        width=6,
    ),
    Panel(
        "Since last success",
        [
            ("time() - bridge_source_last_success_timestamp_seconds", "source {{source}}"),
            ("time() - bridge_target_last_success_timestamp_seconds", "target {{target}}"),
        ],
        "s",
        lambda s: {
            **{
                f"source {k}": v
                for k, v in since("bridge_source_last_success_timestamp_seconds", "source")(
                    s
                ).items()
            },
            **{
                f"target {k}": v
                for k, v in since("bridge_target_last_success_timestamp_seconds", "target")(
                    s
                ).items()
            },
        },
        width=12,
    ),
    Panel(
        "Events per second, by type",
        [("sum by (type) (rate(bridge_events_total[$__rate_interval]))", "{{type}}")],
        "ops",
        events_rate,
    ),
    Panel(
        "Delivery attempts per second, by target and outcome",
        [
            (
                "sum by (target, outcome) (rate(bridge_deliveries_total[$__rate_interval]))",
                "{{target}} {{outcome}}",
            )
        ],
        "ops",
        deliveries_rate,
    ),
    Panel(
        "Delivery latency (event detected to delivered)",
        [
            (
                "histogram_quantile(0.5, sum by (target, le) "
                "(rate(bridge_delivery_latency_seconds_bucket[$__rate_interval])))",
                "{{target}} p50",
            ),
            (
                "histogram_quantile(0.95, sum by (target, le) "
                "(rate(bridge_delivery_latency_seconds_bucket[$__rate_interval])))",
                "{{target}} p95",
            ),
        ],
        "s",
        latency,
    ),
    Panel(
        "Outbox depth (deliveries waiting)",
        [("bridge_outbox_depth", "{{target}}")],
        "short",
        gauge("bridge_outbox_depth", "target"),
    ),
    Panel(
        "Dead letters",
        [("bridge_dead_letters", "{{target}}")],
        "short",
        gauge("bridge_dead_letters", "target"),
    ),
    Panel(
        "Resident memory",
        [("process_resident_memory_bytes", "resident")],
        "bytes",
        memory,
    ),
]


# -- the Grafana JSON -----------------------------------------------------------------------------


def grafana() -> dict[str, Any]:
    panels = []
    x = y = 0
    row_height = 0
    for n, panel in enumerate(PANELS, 1):
        if x + panel.width > 24:
            x, y = 0, y + row_height
        height = 5 if panel.kind == "state" else 8
        row_height = max(row_height if x else 0, height)
        targets = [
            {"refId": chr(64 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(panel.exprs, 1)
        ]
        if panel.kind == "state":
            body: dict[str, Any] = {
                "type": "stat",
                "fieldConfig": {
                    "defaults": {
                        "mappings": [
                            {
                                "type": "value",
                                "options": {
                                    "0": {"text": "DOWN", "color": "red"},
                                    "1": {"text": "UP", "color": "green"},
                                },
                            }
                        ],
                        "thresholds": {
                            "mode": "absolute",
                            "steps": [
                                {"color": "red", "value": None},
                                {"color": "green", "value": 1},
                            ],
                        },
                    },
                    "overrides": [],
                },
                "options": {
                    "colorMode": "background",
                    "graphMode": "none",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "textMode": "value_and_name",
                },
            }
        else:
            body = {
                "type": "timeseries",
                "fieldConfig": {
                    "defaults": {"unit": panel.unit, "custom": {"fillOpacity": 10}},
                    "overrides": [],
                },
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            }
        panels.append(
            {
                "id": n,
                "title": panel.title,
                "datasource": DS,
                "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
                "targets": targets,
                **body,
            }
        )
        x += panel.width
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "pluginId": "prometheus",
            }
        ],
        "title": "mj-bridge",
        "uid": "mj-bridge",
        "tags": ["mj-bridge"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
        "templating": {"list": []},
        "annotations": {"list": []},
    }


DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


# -- a real run -----------------------------------------------------------------------------------


async def collect(seconds: float) -> list[Scrape]:
    rng = random.Random(1)
    async with (
        Simulator("midjourney-proxy", api_key=SIM_KEY) as sim,
        Receiver(Reply(200, b"ok", delay=0.02)) as pipeline,
        Receiver(Reply(200, b"ok", delay=0.05)) as archive,
        aiohttp.ClientSession() as http,
    ):
        config = Config.model_validate(
            {
                "sources": [
                    {
                        "name": "mj",
                        "base_url": sim.url,
                        "api_key": SIM_KEY,
                        "auth": "mj-api-secret",
                        "poll_interval": "1s",
                    }
                ],
                "targets": {
                    "pipeline": {"webhook": f"{pipeline.url}/hook"},
                    "archive": {"webhook": f"{archive.url}/hook", "max_attempts": 20},
                },
                "rules": [
                    {"name": "all", "on": ["task.*"], "to": ["pipeline"]},
                    {
                        "name": "finished",
                        "on": ["task.succeeded", "task.failed"],
                        "to": ["archive"],
                    },
                ],
                "server": {"listen": "127.0.0.1:0"},
            }
        )
        db = ROOT / ".dashboard.db"
        db.unlink(missing_ok=True)
        scrapes: list[Scrape] = []
        try:
            async with running_bridge(config, db) as harness:
                start = time.time()
                while (now := time.time()) - start < seconds:
                    phase = (now - start) / seconds
                    # The archive is down for the middle fifth of the run, then recovers.
                    archive.default = (
                        Reply(503, b"maintenance") if 0.4 <= phase < 0.6 else Reply(200, delay=0.05)
                    )
                    for _ in range(rng.randint(0, 3)):
                        outcome = rng.choice(("success",) * 5 + ("failure",))
                        sim.add_task("a lighthouse", outcome=outcome, steps=rng.randint(2, 5))
                    sim.tick()
                    async with http.get(f"{harness.url}/metrics") as resp:
                        text = await resp.text()
                    samples = {
                        (s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text)
                        for s in family.samples
                    }
                    scrapes.append((time.time(), samples))
                    await asyncio.sleep(max(0.0, STEP - (time.time() - now)))
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        return scrapes


# -- the picture ----------------------------------------------------------------------------------

COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a"]


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:.0f} MiB"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "ops":
        return f"{value:.1f}/s"
    return f"{value:.3g}"


def _chart(series: Series, unit: str, t0: float, t1: float, width: int) -> str:
    w, h, pad = width, 190, 52
    floor = 1.0 if unit in ("short", "bytes", "none") else 1e-3  # an empty panel still reads well
    top = max([v for pts in series.values() for _, v in pts] + [floor]) * 1.1
    parts = [f'<svg width="{w}" height="{h + 20}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):
        y = 8 + (h - 8) * i / 4
        parts.append(f'<line x1="{pad}" x2="{w}" y1="{y}" y2="{y}" stroke="#2c3235"/>')
        label = _fmt(top * (4 - i) / 4, unit)
        parts.append(f'<text x="{pad - 6}" y="{y + 4}" text-anchor="end">{label}</text>')
    for i in range(5):
        at = t0 + (t1 - t0) * i / 4
        x = pad + (w - pad) * i / 4
        stamp = time.strftime("%H:%M:%S", time.gmtime(at))
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        parts.append(f'<text x="{x}" y="{h + 16}" text-anchor="{anchor}">{stamp}</text>')
    for n, points in enumerate(series.values()):
        if not points:
            continue
        coords = " ".join(
            f"{pad + (w - pad) * (at - t0) / max(t1 - t0, 1):.1f},{8 + (h - 8) * (1 - v / top):.1f}"
            for at, v in points
        )
        color = COLORS[n % len(COLORS)]
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{coords}"/>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span><i style="background:{COLORS[n % len(COLORS)]}"></i>{html.escape(name)}</span>'
        for n, name in enumerate(series)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _state(series: Series) -> str:
    cells = []
    for name, points in series.items():
        up = bool(points and points[-1][1] >= 1)
        cells.append(
            f'<div class="stat {"up" if up else "down"}"><b>{"UP" if up else "DOWN"}</b>'
            f"{html.escape(name)}</div>"
        )
    return f'<div class="stats">{"".join(cells)}</div>'


def page(scrapes: list[Scrape]) -> str:
    t0, t1 = scrapes[0][0], scrapes[-1][0]
    # The state panels show the moment the archive was down, as Grafana would at that time.
    outage = [s for s in scrapes if s[1].get(("bridge_target_up", (("target", "archive"),))) == 0]
    state_at = scrapes[: scrapes.index(outage[len(outage) // 2]) + 1] if outage else scrapes
    panels = []
    for panel in PANELS:
        width = (1376 + 8) * panel.width // 24 - 8
        if panel.kind == "state":
            content = _state(panel.evaluate(state_at))
        else:
            content = _chart(panel.evaluate(scrapes), panel.unit, t0, t1, width - 24)
        panels.append(
            f'<section style="width:{width}px"><h2>{html.escape(panel.title)}</h2>{content}</section>'
        )
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background:#111217; color:#ccccdc; font:12px Inter, Helvetica, Arial, sans-serif;
       margin:0; padding:12px; width:1400px; }}
header {{ font-size:17px; margin:2px 4px 12px; }} header small {{ color:#8e8e8e; font-size:12px; }}
main {{ display:flex; flex-wrap:wrap; align-items:flex-start; gap:8px; width:1376px; }}
section {{ box-sizing:border-box; background:#181b1f; border:1px solid #2c3235; border-radius:3px; padding:8px 10px; }}
h2 {{ font-size:13px; font-weight:500; margin:0 0 8px; color:#d8d9da; }}
svg text {{ fill:#8e8e8e; font-size:10px; }}
.legend span {{ margin-right:14px; white-space:nowrap; }}
.legend i {{ display:inline-block; width:12px; height:3px; margin:0 5px 3px 0; }}
.stats {{ display:flex; gap:8px; }}
.stat {{ flex:1; border-radius:3px; padding:10px; font-size:13px; color:#fff; }}
.stat b {{ display:block; font-size:22px; }}
.up {{ background:#37872d; }} .down {{ background:#c4162a; }}
</style></head><body>
<header>mj-bridge <small>docs/grafana/mj-bridge.json over {len(scrapes)} scrapes of a real
bridge, {when}; archive target down for a fifth of the run</small></header>
<main>{"".join(panels)}</main></body></html>"""


async def screenshot(markup: str) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = await browser.new_page(viewport={"width": 1424, "height": 800})
        await tab.set_content(markup)
        await tab.screenshot(path=str(PNG_PATH), full_page=True)
        await browser.close()


async def main(seconds: float) -> None:
    JSON_PATH.write_bytes(orjson.dumps(grafana(), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {JSON_PATH.relative_to(ROOT)}")
    scrapes = await collect(seconds)
    await screenshot(page(scrapes))
    print(f"wrote {PNG_PATH.relative_to(ROOT)} from {len(scrapes)} scrapes")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 120.0))

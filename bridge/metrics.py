"""Prometheus metrics through prometheus-client, one registry per Bridge (tests run several),
with the process, Python platform and GC collectors beside the bridge's own. Stages report into it
through plain method calls; gauges that mirror the store (outbox depth, dead letters) or the
deliverer (target state) are refreshed by the server just before a scrape."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from bridge import __version__
from bridge.models import Event

# Event detected to delivered: tens of milliseconds while a target keeps up, hours while it is down.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600)


class TargetState(Protocol):
    """A target's health as the deliverer keeps it (lanes.TargetHealth)."""

    @property
    def up(self) -> bool: ...

    @property
    def failing_since(self) -> float | None: ...

    @property
    def failures(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def last_error_at(self) -> float | None: ...

    @property
    def last_ok(self) -> float | None: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The default registry's collectors, on ours too: CPU, memory, open files, start time,
        # Python version and GC (they read /proc and the interpreter, so any registry may).
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        Info(
            "bridge_build",
            "The bridge's version and the Python it runs on",
            registry=self.registry,
        ).info({"version": __version__, "python": platform.python_version()})
        self.events = Counter(
            "bridge_events",
            "Events emitted, by type and source",
            ["type", "source"],
            registry=self.registry,
        )
        self.store_retries = Counter(
            "bridge_store_retries",
            "Store calls tried again after a transient database error, by kind (busy, locked, "
            "disk full, connection lost, conflict, ...)",
            ["kind"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "bridge_deliveries",
            "Delivery attempts by target and outcome (sent, temporary_failure, permanent_failure)",
            ["target", "outcome"],
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "bridge_outbox_depth",
            "Deliveries waiting in the outbox, by target",
            ["target"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "bridge_dead_letters",
            "Dead letters, by target",
            ["target"],
            registry=self.registry,
        )
        self.poll_seconds = Histogram(
            "bridge_poll_seconds",
            "Time one poll of a source took (successful or not)",
            ["source"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.source_up = Gauge(
            "bridge_source_up",
            "1 while the source answers correctly, 0 while it is down",
            ["source"],
            registry=self.registry,
        )
        self.source_last_success = Gauge(
            "bridge_source_last_success_timestamp_seconds",
            "When the source last answered a poll correctly (Unix time)",
            ["source"],
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "bridge_delivery_latency_seconds",
            "From the event's detection (its delivery's creation) to the target accepting it",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.target_last_success = Gauge(
            "bridge_target_last_success_timestamp_seconds",
            "When the target last accepted a delivery (Unix time)",
            ["target"],
            registry=self.registry,
        )
        self.target_up = Gauge(
            "bridge_target_up",
            "1 while the target accepts deliveries (or has not been tried), 0 from its first "
            "failed attempt until one succeeds",
            ["target"],
            registry=self.registry,
        )

        self.junk_rows = Counter(
            "bridge_junk_rows",
            "Upstream task rows the bridge could not use and skipped, by source and reason",
            ["source", "reason"],
            registry=self.registry,
        )

    def event(self, event: Event) -> None:
        self.events.labels(event.type, event.source).inc()

    def store_retry(self, kind: str) -> None:
        self.store_retries.labels(kind).inc()

    def delivery(self, target: str, outcome: str, n: int = 1) -> None:
        self.deliveries.labels(target, outcome).inc(n)

    def sent(self, target: str, latencies: Sequence[float]) -> None:
        """`target` accepted deliveries created this many seconds ago."""
        histogram = self.delivery_latency.labels(target)
        for seconds in latencies:
            histogram.observe(seconds)
        self.target_last_success.labels(target).set(time.time())

    def poll(self, source: str, seconds: float, up: bool) -> None:
        self.poll_seconds.labels(source).observe(seconds)
        self.source_up.labels(source).set(1 if up else 0)
        if up:
            self.source_last_success.labels(source).set(time.time())

    def set_targets(self, states: Mapping[str, TargetState]) -> None:
        for target, state in states.items():
            self.target_up.labels(target).set(1 if state.up else 0)

    def junk(self, source: str, reasons: Mapping[str, int]) -> None:
        for reason, count in reasons.items():
            self.junk_rows.labels(source, reason).inc(count)

    def set_outbox(self, depth: dict[str, int], dead: dict[str, int], targets: list[str]) -> None:
        for target in targets:
            self.outbox_depth.labels(target).set(depth.get(target, 0))
            self.dead_letters.labels(target).set(dead.get(target, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics through prometheus-client, one registry per Bridge (tests run several).
Stages report into it through plain method calls; gauges that mirror the store (outbox depth,
dead letters) are refreshed by the server just before a scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bridge.models import Event


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "bridge_events",
            "Events emitted, by type and source",
            ["type", "source"],
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

    def event(self, event: Event) -> None:
        self.events.labels(event.type, event.source).inc()

    def delivery(self, target: str, outcome: str, n: int = 1) -> None:
        self.deliveries.labels(target, outcome).inc(n)

    def poll(self, source: str, seconds: float, up: bool) -> None:
        self.poll_seconds.labels(source).observe(seconds)
        self.source_up.labels(source).set(1 if up else 0)

    def set_outbox(self, depth: dict[str, int], dead: dict[str, int], targets: list[str]) -> None:
        for target in targets:
            self.outbox_depth.labels(target).set(depth.get(target, 0))
            self.dead_letters.labels(target).set(dead.get(target, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)

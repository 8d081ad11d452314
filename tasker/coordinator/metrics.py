"""The coordinator's Prometheus metrics (prometheus-client, one registry per coordinator)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tasker.engine.scaling import ScalingHint

__all__ = ["METRIC_NAMES", "CoordinatorMetrics"]

#: The families below (without ``_total``). An in-worker coordinator (``coordinator.in_worker``)
#: writes them to its worker process's multiprocess files too, where a leader's queue gauges
#: would outlive its lead; the ``tasker worker`` supervisor leaves them out of its ``/metrics``.
METRIC_NAMES = frozenset(
    {
        "tasker_coordinator_leader",
        "tasker_coordinator_cycles",
        "tasker_coordinator_cycle_seconds",
        "tasker_coordinator_actions",
        "tasker_coordinator_errors",
        "tasker_queue_depth",
        "tasker_queue_oldest_age_seconds",
        "tasker_queue_in_flight",
        "tasker_queue_completions_per_second",
        "tasker_queue_error_ratio",
        "tasker_live_workers",
        "tasker_desired_workers",
    }
)


class CoordinatorMetrics:
    """Gauges of the leader's view of each queue, and counters of the coordinator's work."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.leader = Gauge(
            "tasker_coordinator_leader", "1 while this coordinator leads", registry=r
        )
        self.cycles = Counter("tasker_coordinator_cycles", "Cycles run as leader", registry=r)
        self.cycle_seconds = Histogram(
            "tasker_coordinator_cycle_seconds", "Duration of a leader's cycle", registry=r
        )
        self.actions = Counter(
            "tasker_coordinator_actions",
            "Recoveries and other actions taken",
            ["action"],
            registry=r,
        )
        self.errors = Counter(
            "tasker_coordinator_errors",
            "Actions that failed (retried next cycle)",
            ["action"],
            registry=r,
        )
        self.depth = Gauge("tasker_queue_depth", "Messages in the queue", ["queue"], registry=r)
        self.oldest = Gauge(
            "tasker_queue_oldest_age_seconds",
            "Age of the oldest visible message",
            ["queue"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tasker_queue_in_flight", "Messages leased by workers", ["queue"], registry=r
        )
        self.completions = Gauge(
            "tasker_queue_completions_per_second",
            "Messages completed per second",
            ["queue"],
            registry=r,
        )
        self.error_ratio = Gauge(
            "tasker_queue_error_ratio",
            "Failed share of the messages processed",
            ["queue"],
            registry=r,
        )
        self.live = Gauge(
            "tasker_live_workers", "Worker pods consuming the queue", ["queue"], registry=r
        )
        self.desired = Gauge(
            "tasker_desired_workers",
            "Worker pods the queue wants (the scaling hint)",
            ["queue"],
            registry=r,
        )

    def forget_queues(self) -> None:
        """Drop the queue gauges (a coordinator that stops leading must not export stale hints
        beside the new leader's)."""
        for gauge in (
            self.depth,
            self.oldest,
            self.in_flight,
            self.completions,
            self.error_ratio,
            self.live,
            self.desired,
        ):
            gauge.clear()

    def publish(self, hints: Iterable[ScalingHint]) -> None:
        """Set the queue gauges from this cycle's hints."""
        for hint in hints:
            self.depth.labels(hint.queue).set(hint.depth)
            self.oldest.labels(hint.queue).set(hint.oldest_age_s)
            self.in_flight.labels(hint.queue).set(hint.in_flight)
            self.completions.labels(hint.queue).set(hint.completions_per_s)
            self.error_ratio.labels(hint.queue).set(hint.error_rate)
            self.live.labels(hint.queue).set(hint.live_replicas)
            self.desired.labels(hint.queue).set(hint.desired_replicas)

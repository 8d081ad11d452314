"""The Prometheus metrics of Tasker's workers, one set per process, and their setters.

Every family is listed, with its labels and meaning, in docs/operations.md ("Worker metrics").
What updates them: :class:`tasker.middleware.metrics.Metrics` (steps, tasks),
:class:`tasker.middleware.finalization.FinalizationClaim` (finalization claims), the circuit
breakers (:func:`set_breaker_state`) and :meth:`tasker.Client.submit` (tasks it creates).

**One set per process.** :func:`worker_metrics` makes it on first use (nothing happens at
import), registered in prometheus-client's default registry. Under ``tasker worker`` each worker
process runs prometheus-client in multiprocess mode: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before the process starts, every update is written to that
process's memory-mapped files there, and the supervisor serves the sum of all its processes on
``/metrics`` (:mod:`tasker.runtime.pod_metrics`). Elsewhere (``dramatiq tasker.actors``, an
application that submits tasks) they are plain in-memory values that an application serving
prometheus-client's default registry exports with its own.

**Cheap.** An update is a lock and a float written to memory (or to the mmap file): no I/O, no
SQL. Label sets are bounded: namespace, workflow, step, state, outcome, breaker; never an id.

This module imports nothing else of Tasker, so any layer may call its setters.
"""

from __future__ import annotations

import threading
from enum import IntEnum

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "STEP_SECONDS_BUCKETS",
    "BreakerState",
    "WorkerMetrics",
    "set_breaker_state",
    "worker_metrics",
]

#: Buckets of ``tasker_step_duration_seconds``: 5 ms to an hour.
STEP_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Buckets of ``tasker_step_attempts``.
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 7, 10, 15, 20)
#: Buckets of ``tasker_finalization_claim_duration_seconds``: one statement.
CLAIM_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class BreakerState(IntEnum):
    """The value of ``tasker_circuit_breaker_state``."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class WorkerMetrics:
    """Every metric family of a worker process (see the module doc), in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        r = registry
        step = ["namespace", "workflow", "step"]
        self.tasks_created = Counter(
            "tasker_tasks_created",
            "Tasks created by this process (a duplicate submission is not counted)",
            ["namespace", "workflow"],
            registry=r,
        )
        self.tasks_finished = Counter(
            "tasker_tasks_finished",
            "Tasks this process moved to a final state or to blocked_by_failures",
            ["state"],
            registry=r,
        )
        self.messages = Counter(
            "tasker_messages",
            "Messages this process's actors processed: done, failed (the actor raised; Dramatiq "
            "may retry it) or skipped (a middleware skipped it)",
            ["queue", "outcome"],
            registry=r,
        )
        self.step_claims = Counter(
            "tasker_step_claims",
            "Deliveries of step messages, by what their claim answered (breaker_open: no claim, "
            "the step's circuit breaker deferred it)",
            ["namespace", "workflow", "outcome"],
            registry=r,
        )
        self.steps_finished = Counter(
            "tasker_steps_finished",
            "Step attempts recorded, by the state the record left the step in",
            [*step, "state"],
            registry=r,
        )
        self.step_duration = Histogram(
            "tasker_step_duration_seconds",
            "Run time of step handlers",
            step,
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.step_attempts = Histogram(
            "tasker_step_attempts",
            "Attempts a step used, observed when it completes or fails for good",
            step,
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.steps_in_progress = Gauge(
            "tasker_steps_in_progress",
            "Step handlers running now",
            ["namespace", "workflow"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.finalization_claims = Counter(
            "tasker_finalization_claim_attempts",
            "Finalization claim attempts: claimed, or already_claimed (contention)",
            ["outcome"],
            registry=r,
        )
        self.finalization_claim_seconds = Histogram(
            "tasker_finalization_claim_duration_seconds",
            "Duration of a finalization claim attempt",
            buckets=CLAIM_SECONDS_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "tasker_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ["breaker"],
            multiprocess_mode="liveall",
            registry=r,
        )


class _Holder:
    lock = threading.Lock()
    metrics: WorkerMetrics | None = None


def worker_metrics() -> WorkerMetrics:
    """This process's metrics, made (and registered in the default registry) on first use."""
    metrics = _Holder.metrics
    if metrics is None:
        with _Holder.lock:
            if _Holder.metrics is None:
                _Holder.metrics = WorkerMetrics()
            metrics = _Holder.metrics
    return metrics


def set_breaker_state(name: str, state: BreakerState | str) -> None:
    """Export circuit breaker ``name``'s state (``tasker_circuit_breaker_state{breaker=name}``):
    a :class:`BreakerState`, or ``"closed"``, ``"open"``, ``"half_open"`` (``"half-open"``).

    For the breakers to call on every transition; ``name`` is a fixed name per breaker
    (``database``, ``pgmq``), never built from data.
    """
    if isinstance(state, str):
        try:
            state = BreakerState[state.strip().upper().replace("-", "_")]
        except KeyError:
            raise ValueError(
                f"unknown circuit breaker state {state!r}: use closed, open or half_open"
            ) from None
    worker_metrics().breaker_state.labels(name).set(int(state))

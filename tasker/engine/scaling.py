"""Scaling hints: how many worker pods each queue wants, computed by a rule in SQL.

Per queue, every coordinator cycle (``tasker.update_scaling_hints`` in
``sql/queries/coordinator.sql``, the rule in ``tasker.desired_replicas_v1``)::

    utilization = in_flight / (live_replicas * capacity)          capacity = processes * threads
    want        = max(ceil(in_flight / (capacity * target_utilization)),
                      ceil(depth / backlog_per_replica))
                  + 1 while the error rate is above error_threshold
    desired     = clamp(want, min, max); a scale-down moves at most half the excess (rounded
                  up); no change inside the cooldown since the last change

``completions_per_s`` is the queue's msg_id growth minus its depth growth over the cycle; the
error rate is the failed share of the messages the queue's live workers processed in the cycle.

A pool of queues one Deployment consumes together (the four orchestration queues) gets a row of
its own, :data:`ORCHESTRATION_POOL`, whose inputs are the sums over its queues: the Deployment
scales on that row, not on the sum of its queues' rows (each at least ``min_replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import cq

__all__ = [
    "ORCHESTRATION_POOL",
    "ScalingHint",
    "ScalingRule",
    "read_scaling_hints",
    "update_scaling_hints",
]

#: The ``tasker.scaling_hints`` row of the orchestration Deployment (all four queues).
ORCHESTRATION_POOL = "orchestration"


@dataclass(frozen=True)
class ScalingRule:
    """The rule's settings (``coordinator.scaling`` in the settings)."""

    processes: int = 2
    threads: int = 8
    target_utilization: float = 0.75
    backlog_per_replica: int = 100
    min_replicas: int = 1
    max_replicas: int = 10
    error_threshold: float = 0.05
    cooldown_s: float = 60.0

    @property
    def capacity(self) -> int:
        """Messages one worker pod processes at once."""
        return self.processes * self.threads


@dataclass(frozen=True)
class ScalingHint:
    """One row of ``tasker.scaling_hints``."""

    queue: str
    depth: int
    oldest_age_s: float
    in_flight: int
    completions_per_s: float
    live_replicas: int
    utilization: float | None
    error_rate: float
    desired_replicas: int
    updated_at: datetime
    changed_at: datetime


def update_scaling_hints(
    conn: Any,
    queues: list[tuple[str, str]],
    rule: ScalingRule,
    *,
    live_s: float,
    pool_queues: Sequence[str] = (),
) -> list[ScalingHint]:
    """Compute and store the hints of ``queues`` (``(dramatiq name, pgmq name)`` pairs), and of
    the :data:`ORCHESTRATION_POOL` made of ``pool_queues`` (Dramatiq names among ``queues``)."""
    params = {
        "pool": ORCHESTRATION_POOL,
        "pool_queues": list(pool_queues),
        "dramatiq": [dramatiq for dramatiq, _ in queues],
        "pgmq": [pgmq for _, pgmq in queues],
        "live_s": live_s,
        "capacity": rule.capacity,
        "target": rule.target_utilization,
        "backlog": rule.backlog_per_replica,
        "min": rule.min_replicas,
        "max": rule.max_replicas,
        "error_threshold": rule.error_threshold,
        "cooldown_s": rule.cooldown_s,
    }
    with conn.cursor(row_factory=class_row(ScalingHint)) as cursor:
        return list(cursor.execute(cq("update_scaling_hints"), params))


def read_scaling_hints(conn: Any) -> list[ScalingHint]:
    """The hints the leading coordinator wrote last (``tasker scale``)."""
    with conn.cursor(row_factory=class_row(ScalingHint)) as cursor:
        return list(cursor.execute(cq("scaling_hints")))

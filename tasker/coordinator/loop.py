"""The coordinator's loop: leader election and one cycle of work every ``interval_s``.

Any number of coordinators may run; the one holding the PostgreSQL advisory lock
:data:`LEADER_LOCK_KEY` (on a connection of its own) leads. The lock goes with its session, so
when the leader dies or loses its connection, a standby takes it on its next cycle. A leader
checks its lock connection at the start of every cycle and stops acting when it is gone. Every
action is guarded by a row lock and a re-check, so two coordinators acting at once (a leader that
has not noticed it lost the lock yet) still recover each thing once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import psycopg

from tasker.brokers.pgmq import PGMQBroker
from tasker.brokers.queue_names import map_queue_name
from tasker.coordinator.metrics import CoordinatorMetrics
from tasker.db.connection import connect, connection_kwargs
from tasker.db.migrate import schema_problem
from tasker.engine.messages import FINALIZE, PROCESS_RESULT, STEP_ENQUEUE, TASK_REQUEST
from tasker.engine.recovery import (
    Recovery,
    fail_unhandled_steps,
    find_lost_steps,
    recover_step,
    recover_stuck_tasks,
)
from tasker.engine.registry import list_workers
from tasker.engine.retention import RetentionReport, apply_retention
from tasker.engine.scaling import ScalingHint, ScalingRule, update_scaling_hints
from tasker.engine.sql import cq
from tasker.engine.staleness import StalenessLimits, dlq_stale_tasks
from tasker.runtime.sender import BrokerSender
from tasker.settings import CoordinatorSettings

__all__ = ["LEADER_LOCK_KEY", "Coordinator", "CycleReport"]

logger = logging.getLogger(__name__)

#: pg_advisory_lock key of the leading coordinator.
LEADER_LOCK_KEY = 7_305_118_273_002
ORCHESTRATION_QUEUES = tuple(
    s.queue for s in (TASK_REQUEST, STEP_ENQUEUE, PROCESS_RESULT, FINALIZE)
)
T = TypeVar("T")

#: The leader's lock session. Server-side TCP keepalives end it within about 25 s when the
#: leader's machine vanishes without closing the connection (the kernel's default would take
#: two hours), so a standby takes over instead of waiting on a dead session's lock.
_LOCK_CONNECTION = connection_kwargs(application_name="tasker-coordinator", timeout_s=5) | {
    "options": connection_kwargs()["options"]
    + " -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


@dataclass
class CycleReport:
    """What one cycle did (empty when this coordinator did not lead)."""

    leader: bool
    recovered: list[Recovery] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    retention: RetentionReport | None = None
    hints: list[ScalingHint] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class Coordinator:
    """Runs the coordinator's cycle for the database of ``broker``.

    ``run(stop)`` loops until ``stop`` is set; ``cycle()`` runs one cycle (tests, ``--once``).
    """

    def __init__(
        self,
        broker: PGMQBroker,
        settings: CoordinatorSettings,
        *,
        name: str | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.metrics = metrics or CoordinatorMetrics()
        self.sender = BrokerSender(broker)
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._last_cycle_at: float | None = None
        self._database_ok = False
        self._schema_problem: str | None = None  # the migrations the database lacks, if any
        self._migrated = False  # seen with every migration: not checked again
        self._last_retention_at = 0.0
        self.leading = False

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run a cycle every ``interval_s`` until ``stop`` is set; then give the lead up."""
        logger.info("Coordinator %s started (every %.1fs)", self.name, self.settings.interval_s)
        try:
            while not stop.is_set():
                started = time.monotonic()
                self.cycle()
                stop.wait(max(self.settings.interval_s - (time.monotonic() - started), 0.05))
        finally:
            self.close()
            logger.info("Coordinator %s stopped", self.name)

    def cycle(self) -> CycleReport:
        """Lead if possible, then run every action once; errors of one action do not stop the
        others (they are logged, counted and retried next cycle)."""
        report = CycleReport(leader=self._lead())
        self.metrics.leader.set(1 if report.leader else 0)
        if report.leader:
            started = time.monotonic()
            self._act(report)
            self.metrics.cycles.inc()
            self.metrics.cycle_seconds.observe(time.monotonic() - started)
        self._last_cycle_at = time.monotonic()
        return report

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness for ``/health/ready``: a cycle completed within three intervals and, in it,
        PostgreSQL answered (a coordinator that cannot reach it is not ready) and, if this one
        leads, had every migration."""
        last = self._last_cycle_at
        fresh = last is not None and time.monotonic() - last < 3 * self.settings.interval_s + 5
        detail = {
            "leader": self.leading,
            "coordinator": self.name,
            "database": "reachable" if self._database_ok else "unreachable",
        }
        if self._schema_problem:
            detail["schema"] = self._schema_problem
        return fresh and self._database_ok and not self._schema_problem, detail

    def close(self) -> None:
        """Give the lead up (close the lock connection)."""
        with self._lock:
            conn, self._lock_conn = self._lock_conn, None
            self.leading = False
        if conn is not None:
            conn.close()

    # -- leadership -----------------------------------------------------------------------

    def _lead(self) -> bool:
        with self._lock:
            was = self.leading
            self.leading = self._check_or_take_lock()
        if self.leading != was:
            logger.warning(
                "Coordinator %s %s the lead", self.name, "took" if self.leading else "lost"
            )
            if not self.leading:
                self.metrics.forget_queues()
        return self.leading

    def _check_or_take_lock(self) -> bool:
        try:
            if self._lock_conn is None or self._lock_conn.closed:
                assert self.broker.url is not None
                self._lock_conn = connect(self.broker.url, **_LOCK_CONNECTION)
            if self.leading:
                self._lock_conn.execute("SELECT 1")  # the lock lives as long as this session
                self._database_ok = True
                return True
            row = self._lock_conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)
            ).fetchone()
            self._database_ok = True
            return bool(row and row[0])
        except psycopg.Error as exc:
            self._database_ok = False
            logger.warning("Coordinator %s cannot reach PostgreSQL: %s", self.name, exc)
            if self._lock_conn is not None:
                self._lock_conn.close()
            self._lock_conn = None
            return False

    # -- the actions ----------------------------------------------------------------------

    def _schema_ready(self, report: CycleReport) -> bool:
        """Whether the database has every migration of this Tasker; else the cycle does nothing
        but say so (once, and once more when it is fixed) and record it in ``report.errors``.
        Once the database had them all, it is not checked again."""
        if self._migrated:
            return True
        checked = self._guarded(report, "schema", lambda conn: (schema_problem(conn),))
        if checked is None:  # the check itself failed (recorded in the report)
            return False
        (problem,) = checked
        self._migrated = problem is None
        if problem != self._schema_problem:
            if problem:
                logger.error("Coordinator %s waits: %s", self.name, problem)
            else:
                logger.warning("Coordinator %s: the database is migrated; acting", self.name)
        self._schema_problem = problem
        if problem:
            report.errors["schema"] = problem
        return problem is None

    def _act(self, report: CycleReport) -> None:
        if not self._schema_ready(report):
            return
        s = self.settings
        report.recovered += self._guarded(report, "recover_steps", self._recover_steps) or []
        report.recovered += (
            self._guarded(
                report,
                "recover_tasks",
                lambda conn: recover_stuck_tasks(
                    conn,
                    self.sender,
                    grace_s=s.recovery_grace_s,
                    limit=s.batch,
                    coordinator=self.name,
                ),
            )
            or []
        )
        report.recovered += (
            self._guarded(
                report,
                "handler_not_found",
                lambda conn: fail_unhandled_steps(
                    conn,
                    self.sender,
                    self._step_queue,
                    after_s=s.handler_not_found_after_s,
                    live_s=s.live_worker_s,
                    limit=s.batch,
                    coordinator=self.name,
                ),
            )
            or []
        )
        report.dead_lettered = self._guarded(report, "staleness", self._staleness) or []
        if time.monotonic() - self._last_retention_at >= s.retention_every_s:
            report.retention = self._guarded(report, "retention", self._retention)
            self._last_retention_at = time.monotonic()
        report.hints = self._guarded(report, "scaling", self._scaling) or []
        for recovery in report.recovered:
            self.metrics.actions.labels(recovery.action).inc()
        self.metrics.actions.labels("dlq_stale_task").inc(len(report.dead_lettered))
        self.metrics.publish(report.hints)

    def _guarded(
        self, report: CycleReport, action: str, run: Callable[[psycopg.Connection[Any]], T]
    ) -> T | None:
        try:
            with self.broker.pool.connection() as conn:
                return run(conn)
        except Exception as exc:
            logger.exception("Coordinator action %s failed; it runs again next cycle", action)
            self.metrics.errors.labels(action).inc()
            report.errors[action] = str(exc)
            return None

    def _recover_steps(self, conn: psycopg.Connection[Any]) -> list[Recovery]:
        s = self.settings
        lost = find_lost_steps(conn, self._step_queue, grace_s=s.recovery_grace_s, limit=s.batch)
        done = []
        for candidate in lost:
            recovery = recover_step(
                conn, self.sender, candidate, self._step_queue, coordinator=self.name
            )
            if recovery is not None:
                done.append(recovery)
        return done

    def _staleness(self, conn: psycopg.Connection[Any]) -> list[str]:
        st = self.settings.staleness
        limits = StalenessLimits(
            steps_in_process=st.steps_in_process_minutes,
            waiting_for_retry=st.waiting_for_retry_minutes,
            waiting_for_dependencies=st.waiting_for_dependencies_minutes,
            blocked_by_failures=st.blocked_by_failures_minutes,
            lifetime=st.max_lifetime_minutes,
        )
        return dlq_stale_tasks(conn, limits, limit=self.settings.batch, coordinator=self.name)

    def _retention(self, conn: psycopg.Connection[Any]) -> RetentionReport:
        s = self.settings
        report = apply_retention(
            conn, days=s.retention_days, batch=s.retention_batch, coordinator=self.name
        )
        report = dataclasses.replace(
            report, dead_letters_expired=self.broker.expire_all_dead_letters()
        )
        if report.tasks:
            logger.info("Retention deleted %d finished task(s)", report.tasks)
        return report

    def _scaling(self, conn: psycopg.Connection[Any]) -> list[ScalingHint]:
        # the engine's rule has the settings' fields (the engine may not import the settings)
        rule = ScalingRule(**msgspec.structs.asdict(self.settings.scaling))
        return update_scaling_hints(
            conn,
            self._queues(conn),
            rule,
            live_s=self.settings.live_worker_s,
            pool_queues=ORCHESTRATION_QUEUES,
        )

    def _queues(self, conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
        """Every Dramatiq queue worth a hint, with its PGMQ name: the orchestration queues, each
        workflow namespace's step queue, and every queue a live worker consumes."""
        names = set(ORCHESTRATION_QUEUES)
        names |= {f"worker_{row[0]}_queue" for row in conn.execute(cq("known_step_queues"))}
        for worker in list_workers(conn, live_s=self.settings.live_worker_s):
            if worker.live:
                names |= set(worker.queues)
        return sorted((name, map_queue_name(name, self.broker.namespace).main) for name in names)

    def _step_queue(self, namespace: str) -> str:
        return map_queue_name(f"worker_{namespace}_queue", self.broker.namespace).main

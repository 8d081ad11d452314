"""A fault-test harness after the protocol of the reliability anchors (§B9.2), for one machine.

A :class:`FaultHarness` runs real ``tasker worker`` processes against a private PostgreSQL, submits
workflows whose handlers write an idempotency ledger and an execution log, records every accepted
task (in the manner of Jepsen's queue checker), and checks the invariants once the system settled:

* I1 no loss: every accepted task is final (and, unless told otherwise, ``complete``);
* I2 exactly-once effect: every step of a complete task has exactly one ledger row (duplicate
  *executions* are allowed under faults, counted and reported);
* I4 no orphans: no step is left ``in_progress``/``enqueued``, no message is left in any queue,
  and nothing was dead-lettered;
* I6 retry accounting: ``attempts <= max_attempts`` for every step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import tasker
from tests.support import ROOT
from tests.workers.ledger_flows import SCHEMA

# settled: final, or waiting in blocked_by_failures for a decision
FINAL = ("complete", "error", "cancelled", "resolved_manually", "blocked_by_failures")
WORKER_SETTINGS = {
    "TASKER_BROKER__VISIBILITY_TIMEOUT_MS": "5000",
    "TASKER_BROKER__POLL_INTERVAL_MS": "200",
    "TASKER_ENGINE__FINALIZATION_CLAIM_LEASE_S": "5",
    "TASKER_DATABASE__TIMEOUT_S": "3",
}


def query(
    url: str, statement: str | sql.Composable, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Rows of ``statement``, retried for up to 30 s while the server restarts."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
                cursor = conn.execute(statement, params)
                return cursor.fetchall() if cursor.description is not None else []
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def terminate_tasker_sessions(url: str) -> int:
    """``pg_terminate_backend`` every Tasker session of the database; how many there were."""
    rows = query(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name LIKE 'tasker%%'",
    )
    return int(rows[0][0])


@dataclass
class Report:
    """What the checker found (the fields are the invariants' evidence)."""

    accepted: int
    states: dict[str, int]
    duplicate_executions: int
    problems: list[str] = field(default_factory=list)


class FaultHarness:
    """Workers, a workload and the invariant checker on the database at ``url``."""

    def __init__(self, url: str, log_dir: Path) -> None:
        self.url = url
        self.log_dir = log_dir
        self.accepted: list[str] = []
        self.rejected = 0
        self._submitted = 0
        self.workers: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        query(url, SCHEMA)
        self.client = tasker.Client(url=url, timeout_s=3)

    # -- workers ---------------------------------------------------------------------------

    def start_workers(self, *, processes: int = 2, threads: int = 4) -> subprocess.Popen[bytes]:
        """``tasker worker tests.workers.ledger_flows`` in its own process group."""
        env = dict(os.environ, TASKER_ENV="test", TASKER_DATABASE__URL=self.url)
        env["PYTHONPATH"] = str(ROOT)
        env.update(WORKER_SETTINGS)
        command = [sys.executable, "-m", "tasker.cli", "worker", "tests.workers.ledger_flows"]
        command += ["-p", str(processes), "-t", str(threads), "--shutdown-timeout", "10"]
        log = (self.log_dir / f"worker{len(self.workers)}.log").open("ab")
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.workers.append(proc)
        self.wait(
            lambda: query(self.url, "SELECT count(*) FROM tasker.named_tasks")[0][0] >= 4,
            60,
            "the workers to register their templates",
        )
        return proc

    def stop(self) -> None:
        """Stop the workers (their whole process groups) and the client."""
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.client.close()

    def worker_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    # -- workload --------------------------------------------------------------------------

    def submit(self, name: str = "ledger", context: dict[str, Any] | None = None) -> str | None:
        """Submit one workflow (a new task every time); record it if the database accepted it."""
        with self._lock:
            self._submitted += 1
            number = self._submitted
        try:
            handle = self.client.submit("faults", name, {**(context or {}), "n": number})
        except tasker.DatabaseUnavailableError:
            with self._lock:
                self.rejected += 1
            return None
        with self._lock:
            self.accepted.append(handle.task_uuid)
        return handle.task_uuid

    def submit_for(self, seconds: float, *, every_s: float = 0.2, **context: Any) -> None:
        """Submit ``ledger`` workflows for ``seconds`` (bounded), one every ``every_s``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.submit("ledger", context)
            time.sleep(every_s)

    def in_background(self, action: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=action, daemon=True)
        thread.start()
        return thread

    # -- checking --------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.worker_log()}")

    def settle(self, timeout: float = 120) -> None:
        """Wait until every accepted task is final and every queue is empty."""
        self.wait(lambda: self._unfinished() == 0, timeout, "every accepted task to finish")
        self.wait(lambda: self._messages_left() == 0, 60, "every queue to empty")

    def _unfinished(self) -> int:
        rows = query(
            self.url,
            "SELECT count(*) FROM tasker.tasks WHERE task_uuid = ANY(%s::uuid[])"
            " AND state <> ALL(%s)",
            (self.accepted, list(FINAL)),
        )
        return int(rows[0][0])

    def _messages_left(self) -> int:
        return sum(count for queue, count in self.queue_counts().items() if "__xq" not in queue)

    def queue_counts(self) -> dict[str, int]:
        """Messages per PGMQ queue (dead-letter queues end in ``__xq``)."""
        counts = {}
        for (queue,) in query(self.url, "SELECT queue_name FROM pgmq.meta"):
            table = sql.Identifier("pgmq", "q_" + queue)
            rows = query(self.url, sql.SQL("SELECT count(*) FROM {}").format(table))
            counts[queue] = int(rows[0][0])
        return counts

    def check(self, *, expect: str = "complete") -> Report:
        """Check I1, I2, I4 and I6 for every accepted task; the report lists every violation."""
        url, tasks = self.url, self.accepted
        states = dict(
            query(
                url,
                "SELECT state, count(*) FROM tasker.tasks WHERE task_uuid = ANY(%s::uuid[])"
                " GROUP BY state",
                (tasks,),
            )
        )
        duplicates = query(
            url,
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM fault_exec_log"
            " GROUP BY task_uuid, step, attempt) runs",
        )[0][0]
        report = Report(len(tasks), states, int(duplicates))
        if states.get(expect, 0) != len(tasks):
            report.problems.append(f"I1: expected every task {expect}, found {states}")
        for statement, invariant in _CHECKS:
            rows = query(url, statement, (tasks,))
            if rows:
                report.problems.append(f"{invariant}: {rows[:5]}")
        for queue, count in self.queue_counts().items():
            if "__xq" in queue and count:
                report.problems.append(f"I4: {count} dead letter(s) in {queue}")
        return report


_CHECKS = [
    (  # I2: every complete step has exactly one ledger row
        "SELECT s.task_uuid, s.name, count(l.key) FROM tasker.workflow_steps s"
        " LEFT JOIN fault_ledger l ON l.task_uuid = s.task_uuid AND l.step = s.name"
        " WHERE s.task_uuid = ANY(%s::uuid[]) AND s.state = 'complete'"
        " GROUP BY s.task_uuid, s.name HAVING count(l.key) <> 1",
        "I2 (effect not exactly once)",
    ),
    (  # I4: nothing left mid-flight
        "SELECT task_uuid, name, state FROM tasker.workflow_steps"
        " WHERE task_uuid = ANY(%s::uuid[])"
        " AND state IN ('enqueued', 'in_progress', 'enqueued_for_orchestration',"
        " 'enqueued_as_error_for_orchestration', 'waiting_for_retry')",
        "I4 (a step left mid-flight)",
    ),
    (  # I6: retry accounting holds, also under crashes
        "SELECT task_uuid, name, attempts, max_attempts FROM tasker.workflow_steps"
        " WHERE task_uuid = ANY(%s::uuid[]) AND attempts > max_attempts",
        "I6 (attempts over max_attempts)",
    ),
]

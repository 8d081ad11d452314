"""Faults never lose a step (reliability anchors §B9.2: F1, F4, F6, F11), on a private PostgreSQL.

Each test runs real ``tasker worker`` processes (5 s leases) under a stream of workflows whose
handlers write a ledger, injects one kind of fault, waits for the system to settle, and checks that
every accepted workflow finished, every effect happened exactly once, attempts stayed within
``max_attempts``, and no message was left or dead-lettered.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault_harness import FaultHarness, query, terminate_tasker_sessions
from tests.private_postgres import PrivatePostgres

pytestmark = pytest.mark.slow


@pytest.fixture
def harness(private_database_url: str, tmp_path: Path) -> Iterator[FaultHarness]:
    harness = FaultHarness(private_database_url, tmp_path)
    try:
        yield harness
    finally:
        harness.stop()


def assert_clean(harness: FaultHarness, *, expect: str = "complete") -> None:
    report = harness.check(expect=expect)
    assert report.accepted > 0
    assert report.problems == [], f"{report}\n{harness.worker_log()[-20_000:]}"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_postgres_restart_under_load_loses_nothing(
    harness: FaultHarness, private_postgres: PrivatePostgres, mode: str
) -> None:
    harness.start_workers()
    stream = harness.in_background(lambda: harness.submit_for(8, sleep_s=0.05))
    harness.wait(lambda: len(harness.accepted) >= 10, 30, "the workload to run")
    private_postgres.restart(mode)  # type: ignore[arg-type]
    stream.join(timeout=60)
    harness.settle()
    assert_clean(harness)


def test_repeated_backend_terminations_lose_nothing(harness: FaultHarness) -> None:
    harness.start_workers()
    stream = harness.in_background(lambda: harness.submit_for(16, sleep_s=0.05))
    terminated = 0
    for _ in range(8):  # every 2 s for 16 s
        time.sleep(2)
        terminated += terminate_tasker_sessions(harness.url)
    stream.join(timeout=60)
    harness.settle()
    assert terminated > 8
    assert_clean(harness)


def test_terminations_aimed_at_workers_mid_step_lose_nothing(harness: FaultHarness) -> None:
    harness.start_workers()
    for _round in range(3):
        task = harness.submit("ledger", {"sleep_s": 1.0})
        assert task is not None
        harness.wait(
            lambda task=task: (
                query(  # type: ignore[misc]
                    harness.url,
                    "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = %s"
                    " AND state = 'in_progress'",
                    (task,),
                )[0][0]
                > 0
            ),
            30,
            "a step to be running",
        )
        assert terminate_tasker_sessions(harness.url) > 0  # its connections die mid-step
    harness.settle()
    assert_clean(harness)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_worker_process_killed_mid_step_is_replaced_and_the_step_runs_again(
    harness: FaultHarness, how: str
) -> None:
    supervisor = harness.start_workers(processes=1)
    stream = harness.in_background(lambda: harness.submit_for(4, every_s=0.5))
    dying = [harness.submit("die_once", {"how": how}) for _ in range(2)]
    stream.join(timeout=60)
    harness.settle()
    assert_clean(harness)
    assert supervisor.poll() is None  # the supervisor kept running
    for task in dying:
        attempts = query(
            harness.url,
            "SELECT attempts FROM tasker.workflow_steps WHERE task_uuid = %s AND name = 'fragile'",
            (task,),
        )[0][0]
        # Attempt 1 killed its process; attempt 2 runs, unless the other dying task's first
        # attempt kills the process it shares with it, and then attempt 3 (the last) runs.
        assert attempts in (2, 3)
    assert "restarting in" in harness.worker_log()


def test_a_step_that_always_kills_its_worker_fails_after_its_attempts(
    harness: FaultHarness,
) -> None:
    supervisor = harness.start_workers(processes=2)
    doomed = harness.submit("always_dies")
    harness.submit_for(3, every_s=0.3)  # other workflows keep flowing meanwhile
    harness.wait(
        lambda: (
            query(harness.url, "SELECT state FROM tasker.tasks WHERE task_uuid = %s", (doomed,))
            == [("blocked_by_failures",)]  # it waits for a decision
        ),
        90,
        "the doomed task to fail and wait for a decision",
    )
    harness.accepted.remove(str(doomed))
    harness.settle()
    assert_clean(harness)
    step = query(
        harness.url,
        "SELECT state, attempts, results->'error'->>'error_type' FROM tasker.workflow_steps"
        " WHERE task_uuid = %s",
        (doomed,),
    )
    assert step == [("error", 2, "worker_died")]
    assert supervisor.poll() is None
    assert os.getpgid(supervisor.pid) == supervisor.pid  # still the same supervisor
    runs = query(harness.url, "SELECT count(*) FROM fault_exec_log WHERE task_uuid = %s", (doomed,))
    assert runs == [(2,)]  # bounded by max_attempts, not by the broker's max_deliveries


def test_a_double_sigterm_releases_running_steps_at_once_and_gives_their_attempt_back(
    harness: FaultHarness,
) -> None:
    supervisor = harness.start_workers(processes=1)
    task = harness.submit("slow_once")  # one step, max_attempts=1, 30 s on its first run
    running = (
        "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = %s AND state = 'in_progress'"
    )
    harness.wait(lambda: query(harness.url, running, (task,))[0][0] == 1, 30, "the step to run")
    os.kill(supervisor.pid, signal.SIGTERM)
    harness.wait(lambda: "graceful stop" in harness.worker_log(), 30, "the graceful stop")
    os.kill(supervisor.pid, signal.SIGTERM)  # the impatient operator's second request
    supervisor.wait(timeout=30)
    leased = query(
        harness.url, "SELECT count(*) FROM pgmq.q_tasker_worker_faults_queue WHERE vt > now()"
    )
    claimed = query(
        harness.url,
        "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = %s AND claimed_until > now()",
        (task,),
    )
    assert leased == [(0,)] and claimed == [(0,)]  # visible and re-claimable at once
    harness.start_workers(processes=1)  # the step runs again as the same attempt
    harness.settle()
    assert_clean(harness)
    step = query(
        harness.url, "SELECT attempts FROM tasker.workflow_steps WHERE task_uuid = %s", (task,)
    )
    assert step == [(1,)]

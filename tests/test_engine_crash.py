"""A worker SIGKILLed in the middle of a step: the task still completes, the effect is once."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

import tasker
from tests.support import WorkerProcess, scalar, wait_for
from tests.workers.actors import SCHEMA

pytestmark = pytest.mark.slow


def test_sigkilled_worker_mid_step_task_still_completes_once(
    database_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    settings = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 3000}
    workers = [
        WorkerProcess(database_url, tmp_path / f"w{i}.log", "tests.workers.flows", **settings)
        for i in range(2)
    ]
    client = tasker.Client(url=database_url)
    try:
        workers[0].start()
        wait_for(
            lambda: scalar(database_url, "SELECT count(*) FROM tasker.named_tasks") == 1,
            30,
            "the worker registering its template",
        )
        handle = client.submit("crashy", "slow_chain", {"sleep_s": 3})
        wait_for(
            lambda: scalar(database_url, "SELECT count(*) FROM test_exec_log") == 1,
            30,
            "the slow step to start",
        )
        workers[0].kill()
        workers[1].start()
        status = client.wait(handle.task_uuid, timeout=60)
    finally:
        client.close()
        for worker in workers:
            worker.stop()
    assert status.state == "complete", workers[1].log()
    assert status.step("slow").attempts == 2
    assert status.step("finish").result == {"slow_attempt": 2}
    assert scalar(database_url, "SELECT count(*) FROM test_exec_log") == 2  # ran twice
    assert scalar(database_url, "SELECT count(*) FROM test_ledger") == 1  # effect once
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM tasker.workflow_step_transitions t"
            " JOIN tasker.workflow_steps s USING (workflow_step_uuid)"
            " WHERE s.name = 'slow' AND t.to_state = 'complete'",
        )
        == 1
    )

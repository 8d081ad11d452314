"""The seed's workflow shapes, each happy, with retries, and with a permanent failure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg
import pytest

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.workflows import bind_workflow, install
from tests.shapes import (
    SHAPES,
    Recorder,
    assert_parents_finished_first,
    build_flow,
    descendants,
    expected_values,
)


@pytest.fixture
def client(broker: PGMQBroker) -> Iterator[tasker.Client]:
    install(broker, bind_workflows=False, finalization_lease_s=5)
    yield tasker.Client(broker=broker)


@pytest.fixture
def run_flow(broker: PGMQBroker, client: tasker.Client) -> Iterator[Any]:
    workers: list[dramatiq.Worker] = []

    def run(
        flow: tasker.Workflow, context: dict[str, Any] | None = None, inline: bool = True
    ) -> tasker.TaskStatus:
        bind_workflow(broker, flow, inline=inline)
        client.register(flow)
        if not workers:
            worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
            worker.start()
            workers.append(worker)
        handle = client.submit(flow.namespace, flow.name, context or {})
        return client.wait(handle.task_uuid, timeout=30)

    yield run
    for worker in workers:
        worker.stop()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_happy_path(shape: str, run_flow: Any, database_url: str) -> None:
    recorder = Recorder()
    status = run_flow(build_flow(f"{shape}_ok", SHAPES[shape], recorder))
    assert status.state == "complete"
    expected = expected_values(SHAPES[shape])
    assert {s.name: s.result["value"] for s in status.steps} == expected
    assert sorted(recorder.names()) == sorted(SHAPES[shape])  # each step ran exactly once
    assert_parents_finished_first(database_url, status.task_uuid)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_retryable_failures_succeed_later_after_the_backoff(
    shape: str, run_flow: Any, database_url: str
) -> None:
    recorder = Recorder()
    flaky = frozenset(list(SHAPES[shape])[1:3])
    flow = build_flow(f"{shape}_retry", SHAPES[shape], recorder, retry_once=flaky)
    status = run_flow(flow)
    assert status.state == "complete"
    for step in status.steps:
        assert step.attempts == (2 if step.name in flaky else 1)
    with psycopg.connect(database_url) as conn:
        waits = conn.execute(
            """
            SELECT s.name, w.created_at, r.created_at, s.backoff_request_seconds
            FROM tasker.workflow_steps s
            JOIN tasker.workflow_step_transitions w
              ON w.workflow_step_uuid = s.workflow_step_uuid AND w.to_state = 'waiting_for_retry'
            JOIN tasker.workflow_step_transitions r
              ON r.workflow_step_uuid = s.workflow_step_uuid AND r.to_state = 'enqueued'
             AND r.sort_key > w.sort_key
            WHERE s.task_uuid = %s
            """,
            (status.task_uuid,),
        ).fetchall()
    assert {name for name, *_ in waits} == flaky
    for _name, waited_at, re_enqueued_at, backoff in waits:
        assert backoff == pytest.approx(0.4)  # 0.2 s x 2^1 after the first attempt, no jitter
        assert (re_enqueued_at - waited_at).total_seconds() >= backoff - 0.01
    assert_parents_finished_first(database_url, status.task_uuid)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_permanent_failure_blocks_the_task_and_dependents_never_run(
    shape: str, run_flow: Any, database_url: str
) -> None:
    recorder = Recorder()
    broken = list(SHAPES[shape])[1]
    flow = build_flow(
        f"{shape}_broken", SHAPES[shape], recorder, fail_permanently=frozenset({broken})
    )
    status = run_flow(flow)
    assert status.state == "blocked_by_failures" and status.blocked and not status.finished
    assert status.step(broken).state == "error"
    assert status.step(broken).error["error_type"] == "PermanentError"
    assert status.step(broken).attempts == 1
    never = descendants(SHAPES[shape], broken)
    assert never and not never & set(recorder.names())
    for name in never:
        assert status.step(name).state == "pending"
    with psycopg.connect(database_url) as conn:
        states = [
            row[0]
            for row in conn.execute(
                "SELECT to_state FROM tasker.task_transitions"
                " WHERE task_uuid = %s ORDER BY sort_key",
                (status.task_uuid,),
            )
        ]
    assert states[-1] == "blocked_by_failures"  # it waits for a person (or the coordinator)


def test_decoupled_mode_runs_the_same_shapes(run_flow: Any) -> None:
    recorder = Recorder()
    flow = build_flow("mixed_decoupled", SHAPES["mixed"], recorder, retry_once=frozenset({"left"}))
    status = run_flow(flow, inline=False)
    assert status.state == "complete"
    assert status.step("left").attempts == 2

"""A task whose step failed for good keeps running everything that can still run: steps already
running finish and are recorded, independent branches and their retries run to their end, and
only then does the task move on (blocked_by_failures, then error). Steps below the failure stay
pending."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import dramatiq
import psycopg
import pytest

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.workflows import bind_workflow, install
from tests.shapes import DIAMOND, TREE, Recorder, build_flow, descendants
from tests.support import wait_for


@pytest.fixture
def client(broker: PGMQBroker) -> Iterator[tasker.Client]:
    install(broker, bind_workflows=False, finalization_lease_s=5)
    yield tasker.Client(broker=broker)


@pytest.fixture
def worker(broker: PGMQBroker, client: tasker.Client) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    yield worker
    worker.stop()


def start(broker: PGMQBroker, client: tasker.Client, worker: Any, flow: tasker.Workflow) -> str:
    bind_workflow(broker, flow)
    client.register(flow)
    worker.start()
    return client.submit("shapes", flow.name, {}).task_uuid


def blocked_at(url: str, task_uuid: str) -> datetime:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT min(created_at) FROM tasker.task_transitions"
            " WHERE task_uuid = %s AND to_state IN ('blocked_by_failures', 'error')",
            (task_uuid,),
        ).fetchone()
    assert row is not None and row[0] is not None
    return row[0]  # type: ignore[no-any-return]


def test_a_running_sibling_finishes_before_the_task_moves_on(
    broker: PGMQBroker, client: tasker.Client, worker: Any, database_url: str
) -> None:
    release = threading.Event()
    flow = build_flow("slow_sibling", DIAMOND, Recorder(), fail_permanently=frozenset({"branch_b"}))
    slow = flow.steps["branch_c"]
    original = slow.handler
    assert original is not None

    def held(ctx: tasker.StepContext) -> Any:
        assert release.wait(30)
        return original(ctx)

    flow.steps["branch_c"] = type(slow)(**{**slow.__dict__, "handler": held})
    task = start(broker, client, worker, flow)
    wait_for(lambda: client.status(task).step("branch_b").state == "error", 30, "branch_b fails")
    for _ in range(3):  # it stays running while branch_c runs, however often it is looked at
        status = client.status(task)
        assert status.state == "steps_in_process", status.state
        assert status.step("branch_c").state == "in_progress"
    release.set()
    final = client.wait(task, timeout=30)
    assert final.state == "error"
    assert final.step("branch_c").state == "complete"  # recorded inside a live task
    assert final.step("end").state == "pending"
    finished_c = final.step("branch_c").finished_at
    assert finished_c is not None and blocked_at(database_url, task) >= finished_c


def test_a_siblings_retries_run_before_the_task_moves_on(
    broker: PGMQBroker, client: tasker.Client, worker: Any
) -> None:
    recorder = Recorder()
    flow = build_flow(
        "retrying_sibling",
        DIAMOND,
        recorder,
        fail_permanently=frozenset({"branch_b"}),
        retry_once=frozenset({"branch_c"}),
        backoff=tasker.BackoffPolicy(base_seconds=0.5, jitter=0),
    )
    task = start(broker, client, worker, flow)
    final = client.wait(task, timeout=30)
    assert final.state == "error"
    assert final.step("branch_c").state == "complete"
    assert final.step("branch_c").attempts == 2
    assert final.step("end").state == "pending"
    assert ("branch_c", 2) in recorder.runs


def test_independent_branches_run_to_their_end(
    broker: PGMQBroker, client: tasker.Client, worker: Any
) -> None:
    recorder = Recorder()
    flow = build_flow("subtree", TREE, recorder, fail_permanently=frozenset({"left"}))
    task = start(broker, client, worker, flow)
    final = client.wait(task, timeout=30)
    below = descendants(TREE, "left")
    assert final.state == "error"
    assert final.step("left").state == "error"
    for name in ("root", "right", "leaf_f", "leaf_g"):
        assert final.step(name).state == "complete", name
    for name in below:
        assert final.step(name).state == "pending", name
    assert not below & set(recorder.names())
    assert all(s.state not in ("in_progress", "enqueued", "waiting_for_retry") for s in final.steps)

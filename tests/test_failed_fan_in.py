"""A task whose step failed for good keeps running everything that can still run: steps already
running finish and are recorded, independent branches and their retries run to their end, and
only then does the task move on (to blocked_by_failures, where it waits for a decision). Steps
below the failure stay pending."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import psycopg

import tasker
from tests.shapes import DIAMOND, TREE, Recorder, build_flow, descendants
from tests.support import InProcessFlows, wait_for


def start(flows: InProcessFlows, flow: tasker.Workflow) -> str:
    flows.start(flow)
    return flows.client.submit("shapes", flow.name, {}).task_uuid


def blocked_at(url: str, task_uuid: str) -> datetime:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT min(created_at) FROM tasker.task_transitions"
            " WHERE task_uuid = %s AND to_state IN ('blocked_by_failures', 'error')",
            (task_uuid,),
        ).fetchone()
    assert row is not None and row[0] is not None
    return row[0]  # type: ignore[no-any-return]


def test_a_running_sibling_finishes_before_the_task_moves_on(flows: InProcessFlows) -> None:
    release = threading.Event()
    flow = build_flow("slow_sibling", DIAMOND, Recorder(), fail_permanently=frozenset({"branch_b"}))
    slow = flow.steps["branch_c"]
    original = slow.handler
    assert original is not None

    def held(ctx: tasker.StepContext) -> Any:
        assert release.wait(30)
        return original(ctx)

    flow.steps["branch_c"] = type(slow)(**{**slow.__dict__, "handler": held})
    task = start(flows, flow)
    wait_for(
        lambda: flows.client.status(task).step("branch_b").state == "error", 30, "branch_b fails"
    )
    for _ in range(3):  # it stays running while branch_c runs, however often it is looked at
        status = flows.client.status(task)
        assert status.state == "steps_in_process", status.state
        assert status.step("branch_c").state == "in_progress"
    release.set()
    final = flows.client.wait(task, timeout=30)
    assert final.state == "blocked_by_failures"
    assert final.step("branch_c").state == "complete"  # recorded inside a live task
    assert final.step("end").state == "pending"
    finished_c = final.step("branch_c").finished_at
    assert finished_c is not None and blocked_at(flows.url, task) >= finished_c


def test_a_siblings_retries_run_before_the_task_moves_on(flows: InProcessFlows) -> None:
    recorder = Recorder()
    flow = build_flow(
        "retrying_sibling",
        DIAMOND,
        recorder,
        fail_permanently=frozenset({"branch_b"}),
        retry_once=frozenset({"branch_c"}),
        backoff=tasker.BackoffPolicy(base_seconds=0.5, jitter=0),
    )
    task = start(flows, flow)
    final = flows.client.wait(task, timeout=30)
    assert final.state == "blocked_by_failures"
    assert final.step("branch_c").state == "complete"
    assert final.step("branch_c").attempts == 2
    assert final.step("end").state == "pending"
    assert ("branch_c", 2) in recorder.runs


def test_independent_branches_run_to_their_end(flows: InProcessFlows) -> None:
    recorder = Recorder()
    flow = build_flow("subtree", TREE, recorder, fail_permanently=frozenset({"left"}))
    task = start(flows, flow)
    final = flows.client.wait(task, timeout=30)
    below = descendants(TREE, "left")
    assert final.state == "blocked_by_failures"
    assert final.step("left").state == "error"
    for name in ("root", "right", "leaf_f", "leaf_g"):
        assert final.step(name).state == "complete", name
    for name in below:
        assert final.step(name).state == "pending", name
    assert not below & set(recorder.names())
    assert all(s.state not in ("in_progress", "enqueued", "waiting_for_retry") for s in final.steps)

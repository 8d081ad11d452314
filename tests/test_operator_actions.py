"""Operating workflows: cancel a task, retry, resolve or complete a failed step, failures that
wait for a decision, and a wait woken by the task's own commit (tasker.engine.actions, the Client).

Everything runs against real PostgreSQL with an in-process Dramatiq worker.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from msgspec.structs import replace

import tasker
from tasker.coordinator.loop import Coordinator
from tasker.engine.staleness import list_dlq
from tasker.settings import CoordinatorSettings, StalenessSettings
from tests.support import InProcessFlows, age_task, scalar, wait_for

OPS = "ops@example.com"
NOW = CoordinatorSettings(recovery_grace_s=0, retention_every_s=0, interval_s=1)


def _diamond(name: str, failing: set[str]) -> tasker.Workflow:
    """A diamond whose ``end`` returns what it read from its parents; steps in ``failing`` fail
    permanently until the test removes them from the set."""
    flow = tasker.Workflow("ops", name, version="1.0.0", register=False)

    @flow.step()
    def start(ctx: tasker.StepContext) -> dict[str, int]:
        return {"n": 1}

    for branch in ("left", "right"):

        def handler(ctx: tasker.StepContext, _name: str = branch) -> dict[str, int]:
            if _name in failing:
                raise tasker.PermanentError(f"{_name} is broken")
            return {"n": ctx.parent_results["start"]["n"] + 1}

        flow.step(branch, depends_on=["start"])(handler)

    @flow.step(depends_on=["left", "right"])
    def end(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"read": ctx.parent_results}

    return flow


def _run_until_blocked(flows: InProcessFlows, flow: tasker.Workflow) -> tasker.TaskStatus:
    flows.start(flow)
    task = flows.client.submit(flow.namespace, flow.name, {}).task_uuid
    status = flows.client.wait(task, timeout=30)
    assert status.state == "blocked_by_failures" and status.blocked and not status.finished
    return status


# -- failures wait for a decision ------------------------------------------------------------


def test_a_failed_step_leaves_the_task_waiting_and_resolve_lets_dependents_run(
    flows: InProcessFlows,
) -> None:
    status = _run_until_blocked(flows, _diamond("resolve", {"left"}))
    task = status.task_uuid
    assert status.step("left").state == "error" and status.step("end").state == "pending"
    assert flows.client.status(task).state == "blocked_by_failures"

    done = flows.client.resolve_step(task, "left", by=OPS, reason="handled by hand")
    assert done.step_state == "resolved_manually" and done.reopened

    final = flows.client.wait(task, timeout=30)
    assert final.state == "complete"
    assert final.step("left").state == "resolved_manually"
    # a resolved step has no result: its dependents read None
    assert final.step("end").result == {
        "read": {"start": {"n": 1}, "left": None, "right": {"n": 2}}
    }
    [entry, *_] = flows.client.audit(task, "left")
    assert (entry.to_state, entry.action, entry.by, entry.reason) == (
        "resolved_manually",
        "resolve",
        OPS,
        "handled by hand",
    )
    reopened = [e for e in flows.client.audit(task) if e.action == "resolve"]
    assert [(e.from_state, e.to_state) for e in reopened] == [
        ("blocked_by_failures", "evaluating_results")
    ]


def test_complete_supplies_the_result_dependents_read(flows: InProcessFlows) -> None:
    status = _run_until_blocked(flows, _diamond("complete", {"right"}))
    task = status.task_uuid
    flows.client.complete_step(task, "right", result={"n": 40}, by=OPS, reason="from the ledger")
    final = flows.client.wait(task, timeout=30)
    assert final.state == "complete"
    assert final.step("right").state == "complete" and final.step("right").result == {"n": 40}
    assert final.step("end").result == {
        "read": {"start": {"n": 1}, "left": {"n": 2}, "right": {"n": 40}}
    }


def test_both_failed_branches_must_be_decided_before_the_task_moves_on(
    flows: InProcessFlows,
) -> None:
    status = _run_until_blocked(flows, _diamond("two_failed", {"left", "right"}))
    task = status.task_uuid
    after_one = flows.client.resolve_step(task, "left", by=OPS, reason="one")
    assert after_one.task_state == "blocked_by_failures"  # right still blocks it
    flows.client.complete_step(task, "right", result={"n": 9}, by=OPS, reason="two")
    assert flows.client.wait(task, timeout=30).state == "complete"


def test_retry_runs_a_failed_step_again_with_its_attempts_reset(flows: InProcessFlows) -> None:
    failing = {"left"}
    status = _run_until_blocked(flows, _diamond("retry", failing))
    task = status.task_uuid
    assert status.step("left").attempts == 1
    failing.clear()  # the cause is fixed
    done = flows.client.retry_step(task, "left", by=OPS, reason="deployed the fix")
    assert done.step_state == "pending"
    final = flows.client.wait(task, timeout=30)
    assert final.state == "complete" and final.step("left").attempts == 1
    history = [(e.from_state, e.to_state) for e in reversed(flows.client.audit(task, "left"))]
    assert ("error", "pending") in history
    assert history[-1] == ("in_progress", "complete")


def test_a_blocked_task_moves_to_error_after_the_limit_and_a_retry_runs_it_again(
    flows: InProcessFlows,
) -> None:
    failing = {"left"}
    task = _run_until_blocked(flows, _diamond("timeout", failing)).task_uuid
    settings = replace(NOW, staleness=StalenessSettings(blocked_by_failures_minutes=5))
    coordinator = Coordinator(flows.broker, settings, name="blocked")
    try:
        age_task(flows.url, task, minutes=1)  # past the recovery sweep's grace: not stuck
        for _ in range(2):  # within its limit it waits, and the sweep leaves it alone
            report = coordinator.cycle()
            assert (report.dead_lettered, report.recovered) == ([], [])
        assert scalar(flows.url, "SELECT count(*) FROM tasker.coordinator_actions") == 0
        age_task(flows.url, task, minutes=5)
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()
    given_up = flows.client.status(task)
    assert given_up.state == "error" and given_up.finished
    with psycopg.connect(flows.url, autocommit=True) as conn:
        [entry] = list_dlq(conn)
    assert entry.dlq_reason == "max_retries_exceeded"
    assert entry.original_state == "blocked_by_failures"

    failing.clear()
    done = flows.client.retry_step(task, "left", by=OPS, reason="fixed after the fact")
    assert done.reopened
    assert flows.client.wait(task, timeout=30).state == "complete"
    with psycopg.connect(flows.url, autocommit=True) as conn:
        assert list_dlq(conn) == []  # the DLQ entry was closed by the action
        assert list_dlq(conn, status="manually_resolved")[0].resolved_by == OPS


def test_a_template_lifecycle_sets_its_own_blocked_limit(flows: InProcessFlows) -> None:
    flow = _diamond("own_limit", {"left"})
    flow.lifecycle = {"max_blocked_by_failures_minutes": 2}
    task = _run_until_blocked(flows, flow).task_uuid
    age_task(flows.url, task, minutes=3)  # under the default (60), over the template's (2)
    coordinator = Coordinator(flows.broker, NOW, name="own-limit")
    try:
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()
    assert flows.client.status(task).state == "error"


# -- refused actions ---------------------------------------------------------------------------


def test_actions_the_states_do_not_allow_are_refused_with_the_reason(
    flows: InProcessFlows,
) -> None:
    status = _run_until_blocked(flows, _diamond("refused", {"left"}))
    task = status.task_uuid
    client = flows.client
    with pytest.raises(tasker.ActionNotAllowedError, match="only a step in error can be retried"):
        client.retry_step(task, "start", by=OPS)
    with pytest.raises(tasker.ActionNotAllowedError, match="done already"):
        client.resolve_step(task, "start", by=OPS)
    with pytest.raises(tasker.StepNotFoundError, match="its steps: end, left, right, start"):
        client.resolve_step(task, "nope", by=OPS)
    with pytest.raises(tasker.TaskNotFoundError):
        client.resolve_step("00000000-0000-7000-8000-000000000000", "left", by=OPS)
    with pytest.raises(tasker.TaskNotFoundError, match="not a task id"):
        client.cancel("not-a-uuid", by=OPS)
    with pytest.raises(tasker.PayloadError, match="result"):
        client.complete_step(task, "left", result={"x": float("nan")}, by=OPS)
    with pytest.raises(tasker.ConfigurationError, match="by must be"):
        client.resolve_step(task, "left", by="  ")
    assert client.status(task).state == "blocked_by_failures"  # nothing was half-done

    client.cancel(task, by=OPS, reason="given up")
    with pytest.raises(tasker.ActionNotAllowedError, match="cancelled already") as refused:
        client.cancel(task, by=OPS)
    assert refused.value.state == "cancelled"
    with pytest.raises(tasker.ActionNotAllowedError, match="final task"):
        client.retry_step(task, "left", by=OPS)


def test_a_running_step_is_not_changed_by_hand(flows: InProcessFlows) -> None:
    release = threading.Event()
    flow = tasker.Workflow("ops", "running", version="1.0.0", register=False)

    @flow.step()
    def slow(ctx: tasker.StepContext) -> int:
        assert release.wait(30)
        return 1

    flows.start(flow)
    task = flows.client.submit("ops", "running", {}).task_uuid
    try:
        wait_for(lambda: flows.client.status(task).step("slow").state == "in_progress", 30, "run")
        with pytest.raises(tasker.ActionNotAllowedError, match="running now"):
            flows.client.complete_step(task, "slow", result=2, by=OPS)
    finally:
        release.set()
    assert flows.client.wait(task, timeout=30).step("slow").result == 1


# -- cancel ------------------------------------------------------------------------------------


def _queued(url: str, task: str) -> int:
    """Messages of ``task`` left in any PGMQ queue but the dead-letter ones."""
    with psycopg.connect(url, autocommit=True) as conn:
        queues = [
            row[0]
            for row in conn.execute("SELECT queue_name FROM pgmq.meta")
            if not row[0].endswith("__xq")
        ]
        return sum(
            conn.execute(
                f"SELECT count(*) FROM pgmq.\"q_{queue}\" WHERE message->'args'->>0 = %s",
                (task,),
            ).fetchone()[0]
            for queue in queues
        )


def test_cancel_without_workers_removes_the_queued_messages(broker: Any, database_url: str) -> None:
    client = tasker.Client(broker=broker)
    flow = _diamond("cancel_queued", set())
    client.register(flow)
    task = client.submit("ops", "cancel_queued", {}).task_uuid
    assert _queued(database_url, task) == 1  # start's message
    done = client.cancel(task, by=OPS, reason="not needed")
    assert done.messages_removed == 1 and done.running_steps == ()
    assert len(done.cancelled_steps) == 4
    status = client.status(task)
    assert status.state == "cancelled" and status.finished
    assert {s.state for s in status.steps} == {"cancelled"}
    assert _queued(database_url, task) == 0
    [entry, *_] = client.audit(task)
    assert (entry.to_state, entry.action, entry.by, entry.reason) == (
        "cancelled",
        "cancel",
        OPS,
        "not needed",
    )


@pytest.mark.slow
def test_cancel_during_a_wide_fan_out_starts_no_step_afterwards(flows: InProcessFlows) -> None:
    """50 branches of 1 s each on 4 worker threads: cancel while the first ones run."""
    flow = tasker.Workflow("ops", "fan_out", version="1.0.0", register=False)
    flow.step("root")(lambda ctx: 0)
    for i in range(50):
        flow.step(f"b{i:02d}", depends_on=["root"])(lambda ctx: time.sleep(1) or 1)
    flow.step("join", depends_on=[f"b{i:02d}" for i in range(50)])(lambda ctx: 2)
    flows.start(flow)
    task = flows.client.submit("ops", "fan_out", {}).task_uuid
    wait_for(
        lambda: any(
            s.state == "in_progress" and s.name.startswith("b")
            for s in flows.client.status(task).steps
        ),
        30,
        "a branch running",
    )
    done = flows.client.cancel(task, by=OPS, reason="stop it")
    assert done.running_steps, "the cancel came while branches ran"
    cancelled_at = scalar(
        flows.url,
        "SELECT created_at FROM tasker.task_transitions WHERE task_uuid = %s"
        " ORDER BY sort_key DESC LIMIT 1",
        (task,),
    )
    wait_for(
        lambda: not any(s.state == "in_progress" for s in flows.client.status(task).steps),
        30,
        "the running branches to finish",
    )
    status = flows.client.status(task)
    assert status.state == "cancelled"
    started_after = [s.name for s in status.steps if s.started_at and s.started_at > cancelled_at]
    assert started_after == []
    finished = {s.name for s in status.steps if s.state == "complete"}
    assert set(done.running_steps) <= {s.step_uuid for s in status.steps if s.state == "complete"}
    assert "root" in finished and "join" not in finished
    assert {s.state for s in status.steps} <= {"complete", "cancelled"}
    wait_for(lambda: _queued(flows.url, task) == 0, 30, "no message of the task left")


# -- the wait --------------------------------------------------------------------------------


def test_wait_is_woken_by_the_task_commit_not_by_its_fallback_poll(
    flows: InProcessFlows,
) -> None:
    release = threading.Event()
    flow = tasker.Workflow("ops", "woken", version="1.0.0", register=False)

    @flow.step()
    def gate(ctx: tasker.StepContext) -> int:
        assert release.wait(30)
        return 1

    flows.start(flow)
    task = flows.client.submit("ops", "woken", {}).task_uuid
    wait_for(lambda: flows.client.status(task).step("gate").state == "in_progress", 30, "run")
    seen: list[str] = []
    timer = threading.Timer(0.3, release.set)
    timer.start()
    began = time.monotonic()
    status = flows.client.wait(
        task, timeout=60, poll_interval=10, on_progress=lambda s: seen.append(s.state)
    )
    elapsed = time.monotonic() - began
    timer.join()
    assert status.state == "complete"
    # a read before the wait, one after the notification: no 10 s poll in between
    assert elapsed < 9, f"the wait took {elapsed:.1f}s: woken by the poll, not the notification"
    assert 1 <= len(seen) <= 2, seen


def test_wait_returns_for_a_blocked_task_through_the_notification(
    flows: InProcessFlows,
) -> None:
    flows.start(_diamond("blocked_wait", {"right"}))
    task = flows.client.submit("ops", "blocked_wait", {}).task_uuid
    began = time.monotonic()
    status = flows.client.wait(task, timeout=60, poll_interval=10)
    assert status.blocked and time.monotonic() - began < 9


def test_text_postgresql_cannot_store_is_refused_before_anything_is_written(
    flows: InProcessFlows,
) -> None:
    task = _run_until_blocked(flows, _diamond("bad_text", {"left"})).task_uuid
    client = flows.client
    for call in (
        lambda: client.cancel(task, by="ops", reason="\udcff"),
        lambda: client.resolve_step(task, "left", by="m\udcffe"),
        lambda: client.resolve_step(task, "left", by="ops", reason="nul\x00"),
        lambda: client.submit("ops", "bad_text", {}, version="1\udcff"),
        lambda: client.submit("o\x00ps", "bad_text", {}),
        lambda: client.templates("x\udcff"),
    ):
        with pytest.raises(tasker.TaskerError):
            call()
    assert client.status(task).state == "blocked_by_failures"


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf")])
def test_wait_refuses_a_timeout_that_is_not_a_positive_number(
    flows: InProcessFlows, timeout: float
) -> None:
    with pytest.raises(tasker.ConfigurationError, match="timeout must be a positive"):
        flows.client.wait("00000000-0000-7000-8000-000000000000", timeout=timeout)

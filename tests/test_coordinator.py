"""The coordinator: recovery sweeps, staleness to the task DLQ, handler_not_found, leadership."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import psycopg
import pytest

import tasker
from tasker.coordinator.loop import Coordinator
from tasker.engine.recovery import find_lost_steps, recover_step
from tasker.engine.staleness import get_dlq_entry, list_dlq, resolve_dlq_entry
from tasker.engine.steps import StepRunner, claim_step
from tasker.settings import CoordinatorSettings, StalenessSettings
from tasker.workflow.definition import step_actor_name
from tests.shapes import LINEAR, Recorder, build_flow
from tests.support import InProcessFlows, scalar, step_uuid, wait_for

QUEUE = "pgmq.q_tasker_worker_shapes_queue"
NOW = CoordinatorSettings(recovery_grace_s=0, retention_every_s=0, interval_s=1)


@pytest.fixture
def coordinator(flows: InProcessFlows) -> Iterator[Coordinator]:
    coordinator = Coordinator(flows.broker, NOW, name="test-coordinator")
    yield coordinator
    coordinator.close()


def actions(url: str, action: str) -> int:
    return int(
        scalar(url, "SELECT count(*) FROM tasker.coordinator_actions WHERE action = %s", (action,))
    )


def execute(url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


def test_a_step_whose_message_was_deleted_by_hand_is_sent_again_once(
    flows: InProcessFlows, coordinator: Coordinator
) -> None:
    recorder = Recorder()
    flows.register(build_flow("lost", LINEAR, recorder))
    task = flows.client.submit("shapes", "lost", {}).task_uuid
    execute(flows.url, f"DELETE FROM {QUEUE}")  # an operator "cleans up" the queue
    report = coordinator.cycle()
    assert [r.action for r in report.recovered] == ["resend_step"]
    assert coordinator.cycle().recovered == []  # its message is back: nothing more to do
    flows.start()
    status = flows.client.wait(task)
    assert status.state == "complete"
    assert recorder.names().count("s1") == 1 and status.step("s1").attempts == 1
    assert actions(flows.url, "resend_step") == 1


def test_a_claimed_step_whose_worker_and_message_vanished_goes_back_to_the_retry_rules(
    flows: InProcessFlows, coordinator: Coordinator
) -> None:
    recorder = Recorder()
    flow = build_flow("vanished", LINEAR, recorder, backoff=tasker.BackoffPolicy(0.05, jitter=0))
    flows.register(flow)
    task = flows.client.submit("shapes", "vanished", {}).task_uuid
    s1 = step_uuid(flows.url, task, "s1")
    with psycopg.connect(flows.url, autocommit=True) as conn:  # a worker claims it, then dies
        claim_step(
            conn,
            StepRunner("shapes", "vanished", lambda c: None),
            task,
            s1,
            token="dead",
            lease_s=0.5,
        )
    execute(flows.url, f"DELETE FROM {QUEUE}")  # and its message is gone too
    lease_over = (
        "SELECT claimed_until < now() FROM tasker.workflow_steps WHERE workflow_step_uuid = %s"
    )
    wait_for(lambda: scalar(flows.url, lease_over, (s1,)), 10, "the claim's lease to run out")
    assert [r.action for r in coordinator.cycle().recovered] == ["retry_lost_attempt"]
    flows.start()
    status = flows.client.wait(task)
    assert status.state == "complete"
    assert status.step("s1").attempts == 2  # the lost attempt counted
    assert recorder.names().count("s1") == 1


def test_a_task_whose_finalization_message_was_lost_is_finalized(
    flows: InProcessFlows, coordinator: Coordinator
) -> None:
    flows.register(build_flow("unfinal", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "unfinal", {}).task_uuid
    execute(  # all steps done, the finalization message lost with its holder
        flows.url,
        "UPDATE tasker.workflow_steps SET state = 'complete', results = '{\"result\": 1}'"
        " WHERE task_uuid = %s",
        (task,),
    )
    execute(
        flows.url,
        "UPDATE tasker.tasks SET state = 'evaluating_results' WHERE task_uuid = %s",
        (task,),
    )
    execute(f"{flows.url}", f"DELETE FROM {QUEUE}")
    report = coordinator.cycle()
    assert "reevaluate_task" in [r.action for r in report.recovered]
    assert flows.client.status(task).state == "complete"


def test_a_retry_whose_wake_up_message_was_lost_still_runs(
    flows: InProcessFlows, coordinator: Coordinator
) -> None:
    recorder = Recorder()
    flow = build_flow(
        "sleepy",
        LINEAR,
        recorder,
        retry_once=frozenset({"s1"}),
        backoff=tasker.BackoffPolicy(0.2, jitter=0),
    )
    flows.start(flow)
    task = flows.client.submit("shapes", "sleepy", {}).task_uuid
    wait_for(lambda: flows.client.status(task).state == "waiting_for_retry", 30, "the backoff")
    execute(flows.url, "DELETE FROM pgmq.q_tasker_orchestration_step_enqueue")  # lost
    wait_for(
        lambda: "reevaluate_task" in [r.action for r in coordinator.cycle().recovered],
        30,
        "the coordinator to notice",
    )
    status = flows.client.wait(task)
    assert status.state == "complete" and status.step("s1").attempts == 2


def test_a_step_no_live_worker_can_run_fails_as_handler_not_found(
    flows: InProcessFlows,
) -> None:
    flows.client.register(build_flow("nobody", LINEAR, Recorder()))  # no worker binds it
    task = flows.client.submit("shapes", "nobody", {}).task_uuid
    s1 = step_uuid(flows.url, task, "s1")
    execute(
        flows.url,
        "UPDATE tasker.workflow_steps SET waiting_for = 'a worker', waiting_since = now() -"
        " interval '1 hour' WHERE workflow_step_uuid = %s",
        (s1,),
    )
    actor = step_actor_name("shapes", "nobody", "1.0.0", "s1")
    execute(  # a live worker that has the actor: the step keeps waiting
        flows.url,
        "INSERT INTO tasker.workers (worker_uuid, hostname, pid, queues, actors, threads,"
        " tasker_version) VALUES (gen_random_uuid(), 'h', 1, '{}', ARRAY[%s], 1, 'x')",
        (actor,),
    )
    settings = msgspec.structs.replace(NOW, handler_not_found_after_s=60)
    coordinator = Coordinator(flows.broker, settings, name="hnf")
    assert scalar(flows.url, f"SELECT count(*) FROM {QUEUE}") == 1
    try:
        assert coordinator.cycle().recovered == []
        execute(flows.url, "UPDATE tasker.workers SET last_seen = now() - interval '1 hour'")
        assert [r.action for r in coordinator.cycle().recovered] == ["handler_not_found"]
    finally:
        coordinator.close()
    status = flows.client.status(task)
    assert status.step("s1").state == "error"
    assert status.step("s1").error is not None
    assert status.step("s1").error["error_type"] == "handler_not_found"
    assert status.state in ("blocked_by_failures", "error")
    assert scalar(flows.url, f"SELECT count(*) FROM {QUEUE}") == 0, "it would return for ever"


def _age_task(url: str, task: str, minutes: int) -> None:
    execute(
        url,
        "UPDATE tasker.task_transitions SET created_at = now() - %s * interval '1 minute'"
        " WHERE task_uuid = %s",
        (minutes, task),
    )
    execute(
        url,
        "UPDATE tasker.tasks SET requested_at = now() - %s * interval '1 minute'"
        " WHERE task_uuid = %s",
        (minutes, task),
    )


def test_a_stale_task_goes_to_the_task_dlq_and_error_and_can_be_resolved(
    flows: InProcessFlows,
) -> None:
    flows.client.register(build_flow("stale", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "stale", {"order": 1}).task_uuid
    fresh = flows.client.submit("shapes", "stale", {"order": 2}).task_uuid
    _age_task(flows.url, task, 45)  # steps_in_process, quiet for 45 minutes (limit 30)
    coordinator = Coordinator(flows.broker, NOW, name="stale")
    try:
        report = coordinator.cycle()
    finally:
        coordinator.close()
    assert report.dead_lettered == [task]
    assert flows.client.status(task).state == "error"
    assert flows.client.status(fresh).state == "steps_in_process"
    with psycopg.connect(flows.url, autocommit=True) as conn:
        [entry] = list_dlq(conn)
        assert str(entry.task_uuid) == task and entry.dlq_reason == "staleness_timeout"
        detail = get_dlq_entry(conn, str(entry.dlq_entry_uuid))
        assert detail.task_snapshot is not None
        assert detail.task_snapshot["current_state"] == "steps_in_process"
        assert detail.task_snapshot["threshold_minutes"] == 30
        assert [s["name"] for s in detail.task_snapshot["steps"]] == ["s1", "s2", "s3", "s4"]
        resolve_dlq_entry(
            conn,
            str(entry.dlq_entry_uuid),
            status="manually_resolved",
            notes="re-ran by hand",
            by="ops",
        )
        assert list_dlq(conn) == []
        with pytest.raises(tasker.DlqEntryNotFoundError, match="already resolved"):
            resolve_dlq_entry(
                conn, str(entry.dlq_entry_uuid), status="cancelled", notes=None, by=None
            )


def test_no_step_of_a_given_up_task_starts_afterwards(flows: InProcessFlows) -> None:
    """Staleness leaves the queued message of a given-up task in place; the claim refuses it."""
    recorder = Recorder()
    flow = build_flow("given_up", LINEAR, recorder)
    flows.client.register(flow)
    task = flows.client.submit("shapes", "given_up", {"order": 1}).task_uuid
    _age_task(flows.url, task, 45)
    coordinator = Coordinator(flows.broker, NOW, name="given-up")
    try:
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()
    fresh = flows.run(flow, {"order": 2})  # a worker now consumes the queue, old message first
    assert fresh.state == "complete"
    wait_for(lambda: scalar(flows.url, f"SELECT count(*) FROM {QUEUE}") == 0, 30, "an empty queue")
    assert recorder.names() == ["s1", "s2", "s3", "s4"]  # the fresh task's only
    status = flows.client.status(task)
    assert status.state == "error" and status.step("s1").attempts == 0


def test_a_step_running_on_a_live_lease_keeps_its_task_from_going_stale(
    flows: InProcessFlows,
) -> None:
    """A handler running longer than the state's limit renews its lease: that is activity."""
    flows.client.register(build_flow("long_running", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "long_running", {}).task_uuid
    s1 = step_uuid(flows.url, task, "s1")
    execute(
        flows.url,
        "UPDATE tasker.workflow_steps SET state = 'in_progress', attempts = 1,"
        " last_attempted_at = now() - interval '45 minutes',"
        " claimed_until = now() + interval '1 minute', claim_token = 'running'"
        " WHERE workflow_step_uuid = %s",
        (s1,),
    )
    _age_task(flows.url, task, 45)
    coordinator = Coordinator(flows.broker, NOW, name="lease")
    try:
        assert coordinator.cycle().dead_lettered == []
        execute(
            flows.url,
            "UPDATE tasker.workflow_steps SET claimed_until = now() - interval '1 second'"
            " WHERE workflow_step_uuid = %s",
            (s1,),
        )
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()


def test_a_templates_lifecycle_overrides_the_staleness_settings(flows: InProcessFlows) -> None:
    flow = build_flow("patient", LINEAR, Recorder())
    flow.lifecycle = {"max_steps_in_process_minutes": 120}
    flows.client.register(flow)
    task = flows.client.submit("shapes", "patient", {}).task_uuid
    _age_task(flows.url, task, 45)
    strict = msgspec.structs.replace(NOW, staleness=StalenessSettings(steps_in_process_minutes=10))
    coordinator = Coordinator(flows.broker, strict, name="lifecycle")
    try:
        assert coordinator.cycle().dead_lettered == []  # 45 < 120 minutes
        _age_task(flows.url, task, 180)
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()


def test_two_coordinators_racing_recover_a_step_once(flows: InProcessFlows) -> None:
    flows.register(build_flow("race", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "race", {}).task_uuid
    execute(flows.url, f"DELETE FROM {QUEUE}")
    queue_of = lambda ns: f"tasker_worker_{ns}_queue"  # noqa: E731
    with psycopg.connect(flows.url, autocommit=True) as conn:
        [candidate] = find_lost_steps(conn, queue_of, grace_s=0, limit=10)
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def racer(name: str) -> None:
        with psycopg.connect(flows.url, autocommit=True) as conn:
            barrier.wait()
            results.append(
                recover_step(conn, flows.client._sender, candidate, queue_of, coordinator=name)
            )

    threads = [threading.Thread(target=racer, args=(f"c{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(r is None for r in results) == [False, True]
    assert scalar(flows.url, f"SELECT count(*) FROM {QUEUE}") == 1
    assert actions(flows.url, "resend_step") == 1
    assert task


def test_a_standby_takes_over_within_one_cycle_of_the_leaders_death(
    flows: InProcessFlows,
) -> None:
    first = Coordinator(flows.broker, NOW, name="first")
    second = Coordinator(flows.broker, NOW, name="second")
    try:
        assert first.cycle().leader and not second.cycle().leader
        assert first.cycle().leader and not second.cycle().leader  # the lead stays put
        execute(  # the leader dies: its session goes (here: terminated)
            flows.url,
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE application_name = 'tasker-coordinator' AND pid IN ("
            "  SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
        )
        assert second.cycle().leader  # the standby's next cycle
        assert not first.cycle().leader  # the old leader noticed and stands by
    finally:
        first.close()
        second.close()


def test_the_coordinator_can_run_inside_a_worker(flows: InProcessFlows, database_url: str) -> None:
    from tasker.middleware.coordinator import InWorkerCoordinator

    middleware = InWorkerCoordinator(flows.broker, NOW)
    flows.broker.add_middleware(middleware)
    flows.start()
    wait_for(lambda: middleware.coordinator.leading, 30, "the in-worker coordinator to lead")
    flows.stop()
    assert not middleware.coordinator.leading


def test_a_coordinator_that_cannot_reach_postgresql_is_not_ready(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = Coordinator(flows.broker, NOW, name="ready")
    try:
        assert coordinator.ready()[0] is False  # no cycle yet
        coordinator.cycle()
        ready, detail = coordinator.ready()
        assert ready and detail["database"] == "reachable" and detail["leader"]
        coordinator.close()  # the session ends; the next cycle must connect again
        monkeypatch.setattr(flows.broker, "url", "postgresql://nobody@127.0.0.1:9/none")
        coordinator.cycle()
        ready, detail = coordinator.ready()
        assert not ready and detail["database"] == "unreachable" and not detail["leader"]
    finally:
        coordinator.close()


def test_the_engines_scaling_rule_has_exactly_the_settings_fields() -> None:
    """The coordinator builds one from the other by name (the engine cannot import settings)."""
    import dataclasses

    import msgspec

    from tasker.engine.scaling import ScalingRule
    from tasker.settings import ScalingSettings

    settings = ScalingSettings()
    assert dataclasses.asdict(ScalingRule(**msgspec.structs.asdict(settings))) == (
        msgspec.structs.asdict(settings)
    )

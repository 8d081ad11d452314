"""A fan-in without one lock for all siblings (``tasker.complete_step_v3``, decision 0013).

Siblings complete side by side: none waits for another's transaction. Of two siblings that commit
together, each may miss the other; the recheck after the commit enqueues the join once, and a
task whose rechecks were lost with their process is moved on by the recovery sweep.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tasker.coordinator.loop import Coordinator
from tasker.settings import CoordinatorSettings
from tests.shapes import Recorder, build_flow
from tests.support import InProcessFlows, scalar, step_uuid

NOW = CoordinatorSettings(recovery_grace_s=0, retention_every_s=0, interval_s=1)
PAIR = {"root": [], "left": ["root"], "right": ["root"], "join": ["left", "right"]}
WIDE = {"root": [], **{f"m{i:02d}": ["root"] for i in range(30)}}
WIDE["join"] = [name for name in WIDE if name.startswith("m")]


def _state(url: str, task: str, name: str) -> str:
    return str(
        scalar(
            url,
            "SELECT state FROM tasker.workflow_steps WHERE task_uuid = %s AND name = %s",
            (task, name),
        )
    )


def _run(conn: Any, url: str, task: str, name: str, *, version: int = 3) -> tuple[Any, ...]:
    """Claim step ``name`` and complete it in ``conn``'s open transaction (not committed)."""
    step = step_uuid(url, task, name)
    with psycopg.connect(url, autocommit=True) as claimer:
        claimer.execute("SELECT outcome FROM tasker.claim_step_v2(%s, %s, 30000)", (step, name))
    statement = (
        "SELECT outcome, enqueued_names, follow_up FROM tasker.complete_step_v3(%s, 1, '{}')"
        if version == 3
        else "SELECT outcome, enqueued_names FROM tasker.complete_step_v2(%s, 1, '{}')"
    )
    row = conn.execute(statement, (step,)).fetchone()
    assert row is not None
    return tuple(row)


def _recheck(url: str, task: str, name: str) -> tuple[Any, ...]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT r.enqueued_names, r.follow_up FROM tasker.tasks t,"
            " tasker.enqueue_ready_children_v1(t.task_uuid, %s, true) r"
            " WHERE t.task_uuid = %s AND t.state = 'steps_in_process'",
            (step_uuid(url, task, name), task),
        ).fetchone()
    assert row is not None
    return tuple(row)


def _submitted(flows: InProcessFlows, name: str) -> str:
    flows.client.register(build_flow(name, PAIR, Recorder()))
    task = flows.client.submit("shapes", name, {}).task_uuid
    with psycopg.connect(flows.url, autocommit=True) as conn:
        outcome, enqueued, follow_up = _run(conn, flows.url, task, "root")
    assert (outcome, sorted(enqueued), follow_up) == ("enqueued", ["left", "right"], None)
    return task


def test_siblings_complete_without_waiting_for_each_other(flows: InProcessFlows) -> None:
    task = _submitted(flows, "side_by_side")
    with psycopg.connect(flows.url) as left, psycopg.connect(flows.url) as right:
        right.execute("SET lock_timeout = '2s'")
        # left's transaction stays open while right completes: right does not wait for it
        assert _run(left, flows.url, task, "left") == ("processing", None, "recheck")
        assert _run(right, flows.url, task, "right") == ("processing", None, "recheck")
        left.commit()
        right.commit()
    # each missed the other inside its transaction: the join waits for a recheck
    assert _state(flows.url, task, "join") == "pending"
    assert _recheck(flows.url, task, "left") == (["join"], None)
    assert _recheck(flows.url, task, "right") == (None, None)  # enqueued once
    assert _state(flows.url, task, "join") == "enqueued"


def test_the_previous_completion_serialized_siblings_on_the_task_row(
    flows: InProcessFlows,
) -> None:
    """The contrast that motivated v3: v2 locks the task row for the whole transaction."""
    task = _submitted(flows, "serialized")
    with psycopg.connect(flows.url) as left, psycopg.connect(flows.url) as right:
        right.execute("SET lock_timeout = '200ms'")
        _run(left, flows.url, task, "left", version=2)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            _run(right, flows.url, task, "right", version=2)
        left.rollback()


def test_the_second_sibling_to_commit_enqueues_the_join_itself(flows: InProcessFlows) -> None:
    task = _submitted(flows, "in_turn")
    with psycopg.connect(flows.url) as conn:
        assert _run(conn, flows.url, task, "left") == ("processing", None, "recheck")
        conn.commit()
        assert _run(conn, flows.url, task, "right") == ("enqueued", ["join"], None)
        conn.commit()
    assert _recheck(flows.url, task, "left") == (None, None)  # a late recheck finds it done


def test_a_cancel_waits_for_a_completion_in_flight_and_no_join_follows(
    flows: InProcessFlows,
) -> None:
    task = _submitted(flows, "cancelled_meanwhile")
    with psycopg.connect(flows.url) as left:
        _run(left, flows.url, task, "left")
        with psycopg.connect(flows.url) as canceller:
            canceller.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):  # the completion holds it off
                canceller.execute("SELECT * FROM tasker.cancel_task_v1(%s, 'ops', 'test')", (task,))
        left.commit()
    flows.client.cancel(task, by="ops", reason="test")
    with psycopg.connect(flows.url) as right:
        assert _run(right, flows.url, task, "right")[0] in ("late", "lost")
    assert _state(flows.url, task, "join") == "cancelled"


def test_lost_rechecks_are_made_up_by_the_recovery_sweep(flows: InProcessFlows) -> None:
    """The process died between the siblings' commits and their rechecks."""
    task = _submitted(flows, "lost_recheck")
    with psycopg.connect(flows.url) as left, psycopg.connect(flows.url) as right:
        _run(left, flows.url, task, "left")
        _run(right, flows.url, task, "right")
        left.commit()
        right.commit()
    assert _state(flows.url, task, "join") == "pending"
    coordinator = Coordinator(flows.broker, NOW, name="fan-in")
    try:
        coordinator.cycle()
    finally:
        coordinator.close()
    assert _state(flows.url, task, "join") == "enqueued"


def test_a_wide_fan_in_runs_every_step_once(flows: InProcessFlows) -> None:
    recorder = Recorder()
    flow = build_flow("wide", WIDE, recorder)
    flows.start(flow)
    tasks = [flows.client.submit("shapes", "wide", {}).task_uuid for _ in range(3)]
    for task in tasks:
        assert flows.client.wait(task, timeout=60).state == "complete"
    assert sorted(name for name, _ in recorder.runs) == sorted(list(WIDE) * 3)

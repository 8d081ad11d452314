"""The coordinator's recovery sweep: steps whose message was lost, tasks nothing moves any more.

Messages are lost only to outside causes (deleted by hand, a dropped queue, a dead letter moved
away): Tasker's own code never removes a step's message without recording the step's state in
the same commit. The sweep finds what such a loss strands and puts it back, each recovery in its
own transaction, under the row lock of the step or task, re-checked there, so two coordinators
racing recover it once:

* a step ``enqueued`` with no message in its queue: its message is sent again;
* a step ``in_progress`` whose claim's lease ran out, with no message: the attempt failed
  (``worker_lost``, retryable), and the retry rules decide (attempts counted);
* a step waiting for orchestration (decoupled mode) whose result message was lost: its result is
  processed;
* a task that is not final, with nothing running or scheduled: its next move is computed again
  (and it is finalized when it is finished).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import class_row

from tasker.engine.enqueue import step_messages
from tasker.engine.finalize import finalize_task
from tasker.engine.messages import Sender
from tasker.engine.registry import some_live_worker_has
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.sql import cq, render_cq
from tasker.engine.transitions import move_steps
from tasker.workflow.definition import step_actor_name
from tasker.workflow.states import StepState, TaskState

__all__ = [
    "Recovery",
    "StepCandidate",
    "fail_unhandled_steps",
    "find_lost_steps",
    "recover_step",
    "recover_stuck_tasks",
]

logger = logging.getLogger(__name__)

#: PGMQ table name (``q_`` prefix excluded) of a workflow namespace's step queue.
StepQueueOf = Callable[[str], str]

_WORKER_LOST = {
    "message": "the worker running this step stopped renewing its claim and its message is gone",
    "error_type": "worker_lost",
    "retryable": True,
    "where": "worker",
}


@dataclass(frozen=True)
class StepCandidate:
    """A step that may have lost its message."""

    step_uuid: Any
    task_uuid: Any
    name: str
    state: str
    attempts: int
    namespace: str
    workflow: str
    version: str


@dataclass(frozen=True)
class Recovery:
    """One action of the sweep: what was done to which step or task."""

    action: str
    task_uuid: str
    step_uuid: str | None = None


def find_lost_steps(
    conn: Any, step_queue_of: StepQueueOf, *, grace_s: float, limit: int
) -> list[StepCandidate]:
    """Steps of active tasks, quiet for ``grace_s``, whose message is not in their queue."""
    with conn.cursor(row_factory=class_row(StepCandidate)) as cursor:
        candidates = cursor.execute(
            cq("recovery_candidates"), {"grace_s": grace_s, "limit": limit}
        ).fetchall()
    lost: list[StepCandidate] = []
    for namespace in {c.namespace for c in candidates}:
        group = [c for c in candidates if c.namespace == namespace]
        present = _steps_with_messages(conn, step_queue_of(namespace), group)
        lost += [c for c in group if str(c.step_uuid) not in present]
    return lost


def _steps_with_messages(conn: Any, pgmq_name: str, steps: Iterable[StepCandidate]) -> set[str]:
    table = sql.Identifier("pgmq", "q_" + pgmq_name)
    exists = conn.execute("SELECT to_regclass(%s)", (f"pgmq.q_{pgmq_name}",)).fetchone()
    if exists is None or exists[0] is None:
        return set()  # the queue itself is gone: every message of it is lost
    rows = conn.execute(
        render_cq("live_step_messages", queue=table), {"steps": [str(s.step_uuid) for s in steps]}
    ).fetchall()
    return {row[0] for row in rows}


def recover_step(
    conn: Any,
    sender: Sender,
    candidate: StepCandidate,
    step_queue_of: StepQueueOf,
    *,
    coordinator: str,
) -> Recovery | None:
    """Recover one lost step in one transaction (None: nothing to do any more, on re-check)."""
    with conn.transaction():
        row = conn.execute(cq("lock_step_for_recovery"), {"step": candidate.step_uuid}).fetchone()
        if row is None or _steps_with_messages(
            conn, step_queue_of(candidate.namespace), [candidate]
        ):
            return None
        state, attempts, lease_over = row
        action = _recover(
            conn, sender, candidate, StepState(state), attempts=attempts, lease_over=lease_over
        )
        if action is None:
            return None
        _record(conn, action, candidate.task_uuid, candidate.step_uuid, coordinator, state=state)
    logger.warning("Recovered step %s (%s): %s", candidate.step_uuid, candidate.name, action)
    return Recovery(action, str(candidate.task_uuid), str(candidate.step_uuid))


def _recover(
    conn: Any,
    sender: Sender,
    candidate: StepCandidate,
    state: StepState,
    *,
    attempts: int,
    lease_over: bool | None,
) -> str | None:
    if state is StepState.ENQUEUED:
        messages = step_messages(
            candidate.namespace,
            candidate.workflow,
            candidate.version,
            candidate.task_uuid,
            [(candidate.step_uuid, candidate.name)],
        )
        sender.send_steps(conn, messages)
        return "resend_step"
    if state is StepState.IN_PROGRESS and lease_over is not False:
        return _fail_lost_attempt(conn, sender, candidate, attempts)
    if state in (
        StepState.ENQUEUED_FOR_ORCHESTRATION,
        StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION,
    ):
        process_result(conn, sender, candidate.task_uuid, candidate.step_uuid)
        return "process_result"
    return None


def _fail_lost_attempt(
    conn: Any, sender: Sender, candidate: StepCandidate, attempts: int
) -> str | None:
    document = json.dumps(
        {
            "success": False,
            "result": None,
            "error": _WORKER_LOST,
            "metadata": {"attempt": attempts, "retryable": True},
        }
    )
    params = {"step": candidate.step_uuid, "attempt": attempts, "results": document}
    task = conn.execute(cq("fail_lost_attempt"), params).fetchone()
    if task is None:
        return None
    move_steps(
        conn,
        [candidate.step_uuid],
        [StepState.IN_PROGRESS],
        StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION,
        attempt=attempts,
        reason="worker lost",
    )
    process_result(conn, sender, task[0], candidate.step_uuid)
    return "retry_lost_attempt"


def recover_stuck_tasks(
    conn: Any, sender: Sender, *, grace_s: float, limit: int, coordinator: str
) -> list[Recovery]:
    """Compute again the next move of tasks nothing moves (each in its own transaction)."""
    rows = conn.execute(cq("stuck_tasks"), {"grace_s": grace_s, "limit": limit}).fetchall()
    done: list[Recovery] = []
    for task_uuid, state in rows:
        with conn.transaction():
            reevaluate_task(conn, sender, task_uuid)
            final = None
            if TaskState(_state_of(conn, task_uuid)) in (
                TaskState.EVALUATING_RESULTS,
                TaskState.BLOCKED_BY_FAILURES,
            ):
                final = finalize_task(conn, task_uuid)
            _record(conn, "reevaluate_task", task_uuid, None, coordinator, state=state, final=final)
        logger.warning("Re-evaluated stuck task %s (was %s; now %s)", task_uuid, state, final)
        done.append(Recovery("reevaluate_task", str(task_uuid)))
    return done


def fail_unhandled_steps(
    conn: Any,
    sender: Sender,
    step_queue_of: StepQueueOf,
    *,
    after_s: float,
    live_s: float,
    limit: int,
    coordinator: str,
) -> list[Recovery]:
    """Fail steps whose message has waited ``after_s`` for a worker that has their handler
    while no live worker (seen within ``live_s``) declared that actor: ``handler_not_found``.
    Their messages are deleted in the same transaction (no worker would ever take them)."""
    with conn.cursor(row_factory=class_row(StepCandidate)) as cursor:
        waiting = cursor.execute(
            cq("long_waiting_steps"), {"after_s": after_s, "limit": limit}
        ).fetchall()
    failed: list[Recovery] = []
    for step in waiting:
        actor = step_actor_name(step.namespace, step.workflow, step.version, step.name)
        with conn.transaction():
            if some_live_worker_has(conn, actor, live_s=live_s):
                continue  # a worker has it: the message will reach it
            if not _fail_unhandled(
                conn, sender, step, actor, after_s=after_s, step_queue_of=step_queue_of
            ):
                continue
            _record(
                conn, "handler_not_found", step.task_uuid, step.step_uuid, coordinator, actor=actor
            )
        logger.error("Step %s failed: no live worker has its handler %s", step.step_uuid, actor)
        failed.append(Recovery("handler_not_found", str(step.task_uuid), str(step.step_uuid)))
    return failed


def _fail_unhandled(
    conn: Any,
    sender: Sender,
    step: StepCandidate,
    actor: str,
    *,
    after_s: float,
    step_queue_of: StepQueueOf,
) -> bool:
    error = {
        "message": f"no live worker has had the handler of this step ({actor}) for "
        f"{after_s:.0f}s: deploy a worker with it, then retry the step",
        "error_type": "handler_not_found",
        "retryable": False,
        "where": "worker",
    }
    document = json.dumps(
        {"success": False, "result": None, "error": error, "metadata": {"retryable": False}}
    )
    params = {"step": step.step_uuid, "results": document, "after_s": after_s}
    task = conn.execute(cq("fail_unhandled_step"), params).fetchone()
    if task is None:
        return False
    move_steps(
        conn, [step.step_uuid], [StepState.ENQUEUED], StepState.ERROR, reason="handler not found"
    )
    queue = sql.Identifier("pgmq", "q_" + step_queue_of(step.namespace))
    conn.execute(render_cq("delete_step_messages", queue=queue), {"step": str(step.step_uuid)})
    reevaluate_task(conn, sender, task[0])
    return True


def _state_of(conn: Any, task_uuid: Any) -> str:
    row = conn.execute(cq("task_state"), {"task": task_uuid}).fetchone()
    return str(row[0])


def _record(conn: Any, action: str, task: Any, step: Any, coordinator: str, **detail: Any) -> None:
    conn.execute(
        cq("record_action"),
        {
            "action": action,
            "task": task,
            "step": step,
            "detail": json.dumps(detail, default=str),
            "coordinator": coordinator,
        },
    )

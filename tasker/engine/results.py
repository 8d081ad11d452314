"""Result processing and re-evaluation: decide a step's fate, then move its task forward.

Both run under the task row lock, so sibling results that arrive at the same instant are applied
one after the other and a join is never lost. Result processing is idempotent: it acts only on a
step still waiting for orchestration. The inline success of a step with children does not take
that lock (``tasker.complete_step_v3``, decision 0013); what it leaves for after its commit is a
:class:`FollowUp`, run by :func:`follow_up`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.enqueue import enqueue_ready_steps, step_messages
from tasker.engine.finalize import finish_task
from tasker.engine.messages import STEP_ENQUEUE, Sender
from tasker.engine.sql import q
from tasker.engine.sql_outcomes import ExecutionStatus
from tasker.engine.task_rows import LockedTask, execution_context, lock_task
from tasker.engine.transitions import move_steps, move_task
from tasker.workflow.backoff import BackoffPolicy, decide_retry
from tasker.workflow.definition import Workflow
from tasker.workflow.states import StepState, TaskState

__all__ = [
    "FollowUp",
    "ResultApplied",
    "advance_task",
    "apply_result",
    "follow_up",
    "process_result",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StepResult:
    """A step's recorded outcome, locked for processing (statement ``lock_step_result``)."""

    state: str
    attempts: int
    max_attempts: int
    retryable: bool
    name: str
    results: dict[str, Any] | None


_STEP_RESULT = class_row(_StepResult)


@dataclass(frozen=True)
class FollowUp:
    """What a step's completion leaves to do after its commit (``tasker.complete_step_v3``,
    decision 0013): ``recheck`` its children (one waited for a sibling, and of two siblings
    committing together each may miss the other) or ``evaluate`` the task under its lock (the
    task was in another state than ``steps_in_process``). A recheck that finds nothing of the
    task in flight evaluates it too."""

    kind: str  # "recheck" | "evaluate"
    task_uuid: Any
    step_uuid: Any
    namespace: str
    workflow: str
    version: str


@dataclass(frozen=True)
class ResultApplied:
    """Where a recorded step outcome left its step and its task (for the worker's metrics)."""

    step_state: StepState
    #: The task's state after moving it forward (None: nothing moved it).
    task_state: str | None = None
    #: Left to do after the commit (:func:`follow_up`); None: nothing.
    follow_up: FollowUp | None = None


@dataclass(frozen=True)
class _Recheck:
    """What statement ``recheck_children`` answered."""

    enqueued: list[Any] | None
    enqueued_names: list[str] | None
    follow_up: str | None


_RECHECK = class_row(_Recheck)


def follow_up(conn: Any, sender: Sender, work: FollowUp) -> str | None:
    """Do what a completion left for after its commit, in transactions of its own; returns the
    task's new state when an evaluation moved it (None otherwise).

    A recheck that finds a child ready enqueues it and sends its message in one transaction;
    the enqueue is guarded by the child's state under its row lock, so two rechecks (or a
    recheck and a completion) enqueue it once. A recheck that finds a child held by something
    else evaluates the task. If the process dies before this runs, the task has nothing running
    and the coordinator's recovery sweep moves it on.
    """
    if work.kind == "recheck":
        with conn.transaction(), conn.cursor(row_factory=_RECHECK) as cursor:
            row: _Recheck | None = cursor.execute(
                q("recheck_children"), {"task": work.task_uuid, "step": work.step_uuid}
            ).fetchone()
            if row is None:
                return None  # the task no longer runs: whatever moved it decides
            if row.enqueued:
                pairs = list(zip(row.enqueued, row.enqueued_names or (), strict=True))
                sender.send_steps(
                    conn,
                    step_messages(
                        work.namespace, work.workflow, work.version, work.task_uuid, pairs
                    ),
                )
        if row.follow_up != "evaluate":
            return None
    return reevaluate_task(conn, sender, work.task_uuid)


def process_result(conn: Any, sender: Sender, task_uuid: Any, step_uuid: Any) -> str | None:
    """Apply a recorded step outcome; returns the task's new state (None: nothing to do)."""
    applied = apply_result(conn, sender, task_uuid, step_uuid)
    return None if applied is None else applied.task_state


def apply_result(conn: Any, sender: Sender, task_uuid: Any, step_uuid: Any) -> ResultApplied | None:
    """:func:`process_result`, answering the step's new state too (None: nothing to do)."""
    with conn.transaction():
        task = lock_task(conn, task_uuid)
        if task is None:
            return None
        with conn.cursor(row_factory=_STEP_RESULT) as cursor:
            step = cursor.execute(q("lock_step_result"), {"step": step_uuid}).fetchone()
        if step is None:
            return None
        state = step.state
        if state == StepState.ENQUEUED_FOR_ORCHESTRATION:
            conn.execute(q("complete_step"), {"step": step_uuid})
            move_steps(conn, [step_uuid], [state], StepState.COMPLETE)
            new_state = StepState.COMPLETE
        elif state == StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION:
            if TaskState(task.state).terminal:  # cancelled while it ran: no retry
                conn.execute(q("error_step"), {"step": step_uuid})
                move_steps(conn, [step_uuid], [state], StepState.ERROR, reason=f"task {task.state}")
                new_state = StepState.ERROR
            else:
                new_state = _apply_failure(conn, sender, task, step_uuid, step)
        else:
            return None  # already processed: a duplicate result message
        return ResultApplied(new_state, advance_task(conn, sender, task))


def _apply_failure(
    conn: Any, sender: Sender, task: LockedTask, step_uuid: Any, step: _StepResult
) -> StepState:
    """Retry (after a backoff) or fail the step, as its retry policy decides; returns which."""
    error = (step.results or {}).get("error") or {}
    decision = decide_retry(
        template_retryable=step.retryable,
        error_retryable=bool(error.get("retryable", True)),
        attempts=step.attempts,
        max_attempts=step.max_attempts,
        policy=_policy(task.definition(conn), step.name),
        retry_after=error.get("retry_after"),
    )
    if decision.retry:
        conn.execute(
            q("wait_step_for_retry"), {"step": step_uuid, "delay_s": decision.delay_seconds}
        )
        move_steps(
            conn,
            [step_uuid],
            [StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION],
            StepState.WAITING_FOR_RETRY,
            backoff_seconds=decision.delay_seconds,
            reason=decision.reason,
        )
        delay_ms = max(int(decision.delay_seconds * 1000), 0)
        sender.send_stage(conn, STEP_ENQUEUE, str(task.task_uuid), delay_ms=delay_ms)
        return StepState.WAITING_FOR_RETRY
    conn.execute(q("error_step"), {"step": step_uuid})
    move_steps(
        conn,
        [step_uuid],
        [StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION],
        StepState.ERROR,
        reason=decision.reason,
    )
    return StepState.ERROR


def _policy(flow: Workflow, step: str) -> BackoffPolicy:
    return flow.step_policy(step) if step in flow.steps else flow.backoff


def reevaluate_task(conn: Any, sender: Sender, task_uuid: Any) -> str | None:
    """The step-enqueue stage: enqueue what became ready (retries whose backoff expired)."""
    with conn.transaction():
        task = lock_task(conn, task_uuid)
        if task is None:
            return None
        return advance_task(conn, sender, task)


def advance_task(conn: Any, sender: Sender, task: LockedTask) -> str | None:
    """Move the task forward from its execution context (seed-spec 4.1, later rules)."""
    current = TaskState(task.state)
    if current.terminal or current is TaskState.BLOCKED_BY_FAILURES:
        return None  # late results of a finished task change nothing
    context = execution_context(conn, task.task_uuid)
    status = context.execution_status
    evaluating = _to_evaluating(current)
    if status == ExecutionStatus.BLOCKED_BY_FAILURES:
        final = move_task(
            conn,
            task.task_uuid,
            current,
            *evaluating,
            TaskState.BLOCKED_BY_FAILURES,
            reason="a step failed permanently",
        )
        return final  # it waits for a person, or for the coordinator's limit
    if status == ExecutionStatus.HAS_READY_STEPS:
        enqueue_ready_steps(
            conn,
            sender,
            task.task_uuid,
            namespace=task.namespace,
            workflow=task.workflow,
            version=task.version,
        )
        path = (*evaluating, TaskState.ENQUEUING_STEPS, TaskState.STEPS_IN_PROCESS)
        return move_task(conn, task.task_uuid, current, *path, reason="steps enqueued")
    if status == ExecutionStatus.ALL_COMPLETE:  # finished here, under the task's lock
        return finish_task(conn, sender, task.task_uuid, current)
    if status == ExecutionStatus.PROCESSING:
        if current is TaskState.EVALUATING_RESULTS:  # reopened by an operator while steps run
            return move_task(
                conn, task.task_uuid, current, TaskState.STEPS_IN_PROCESS, reason="steps running"
            )
        return current.value
    return _wait_for_retry(conn, sender, task, current, context.next_retry_at)


def _to_evaluating(current: TaskState) -> tuple[TaskState, ...]:
    return () if current is TaskState.EVALUATING_RESULTS else (TaskState.EVALUATING_RESULTS,)


def _wait_for_retry(
    conn: Any, sender: Sender, task: LockedTask, current: TaskState, next_retry_at: datetime | None
) -> str:
    """Nothing runs and nothing is ready: wait for the earliest retry (re-checked by a delayed
    message, so no poller is needed)."""
    if current is not TaskState.WAITING_FOR_RETRY:
        move_task(
            conn,
            task.task_uuid,
            current,
            *_to_evaluating(current),
            TaskState.WAITING_FOR_RETRY,
            reason="waiting for a retry's backoff",
        )
    if next_retry_at is not None:
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        delay_ms = max(int((next_retry_at - now).total_seconds() * 1000) + 5, 0)
        sender.send_stage(conn, STEP_ENQUEUE, str(task.task_uuid), delay_ms=delay_ms)
    return TaskState.WAITING_FOR_RETRY.value

"""Finalization: set a task's final state, exactly once.

A completion that finds every step complete finishes the task itself, in its own transaction,
under the task's row lock (:func:`finish_task`): no message, no second hop. The finalization
stage (a message, then ``claim``, :func:`finalize_task` and ``release``) remains for contention:
while a finalizer holds the task's claim (``tasker.claim_finalization_v1``: one finalizer at a
time, a lease, an audit row per attempt), the completion leaves the task to it. The task row lock
and the state check make every later finalizer a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row

from tasker.engine.messages import FINALIZE, Sender
from tasker.engine.sql import q
from tasker.engine.sql_outcomes import ExecutionStatus
from tasker.engine.task_rows import execution_context, lock_task
from tasker.engine.transitions import move_task
from tasker.workflow.states import TaskState

__all__ = [
    "ClaimResult",
    "claim_finalization",
    "finalize_task",
    "finish_task",
    "release_finalization",
]

DEFAULT_CLAIM_LEASE_S = 30


@dataclass(frozen=True)
class ClaimResult:
    """The answer of ``tasker.claim_finalization_v1``: whether this holder got the claim, who
    holds it, and the audit message."""

    claimed: bool
    held_by: str | None
    message: str


_CLAIM_RESULT = class_row(ClaimResult)


def claim_finalization(
    conn: Any, task_uuid: Any, holder: str, lease_s: int = DEFAULT_CLAIM_LEASE_S
) -> ClaimResult:
    """Try to become the task's finalizer."""
    params = {"task": task_uuid, "holder": holder, "lease_s": lease_s}
    with conn.cursor(row_factory=_CLAIM_RESULT) as cursor:
        result: ClaimResult = cursor.execute(q("claim_finalization"), params).fetchone()
    return result


def extend_finalization(
    conn: Any, task_uuid: Any, holder: str, lease_s: int = DEFAULT_CLAIM_LEASE_S
) -> bool:
    """Extend the lease of a claim this holder owns."""
    params = {"task": task_uuid, "holder": holder, "lease_s": lease_s}
    return bool(conn.execute(q("extend_finalization"), params).fetchone()[0])


def release_finalization(conn: Any, task_uuid: Any, holder: str) -> bool:
    """Give the claim back (False if this holder did not own it)."""
    row = conn.execute(q("release_finalization"), {"task": task_uuid, "holder": holder}).fetchone()
    return bool(row[0])


def finalize_task(conn: Any, task_uuid: Any) -> str | None:
    """Set the final state if the task is finished; returns it (None: nothing to finalize).

    A task whose failed steps block the rest waits in ``blocked_by_failures`` for a person (a
    manual step action reopens it) or for the coordinator, which moves it to ``error`` after
    ``coordinator.staleness.blocked_by_failures_minutes`` (seed-spec 2.1: finalization never
    gives a task up on its own; docs/decisions/0009).
    """
    with conn.transaction():
        task = lock_task(conn, task_uuid)
        if task is None:
            return None
        current = TaskState(task.state)
        if current.terminal or current is TaskState.BLOCKED_BY_FAILURES:
            return None
        status = execution_context(conn, task_uuid).execution_status
        path = () if current is TaskState.EVALUATING_RESULTS else (TaskState.EVALUATING_RESULTS,)
        if status == ExecutionStatus.ALL_COMPLETE:
            return move_task(
                conn, task_uuid, current, *path, TaskState.COMPLETE, reason="all steps complete"
            )
        if status == ExecutionStatus.BLOCKED_BY_FAILURES:
            return move_task(
                conn,
                task_uuid,
                current,
                *path,
                TaskState.BLOCKED_BY_FAILURES,
                reason="a step failed permanently",
            )
        return None


def finish_task(conn: Any, sender: Sender, task_uuid: Any, current: TaskState) -> str:
    """Complete a task whose steps are all complete, from ``current`` (``steps_in_process``
    or ``evaluating_results``); the caller holds the task's row lock. Returns the new state.

    While a finalizer holds the task's claim, the task only moves to ``evaluating_results`` and
    a finalization message is sent: the claim's holder, or the stage after it, finishes it.
    """
    path = () if current is TaskState.EVALUATING_RESULTS else (TaskState.EVALUATING_RESULTS,)
    if conn.execute(q("finalization_held"), {"task": task_uuid}).fetchone() is not None:
        final = move_task(conn, task_uuid, current, *path, reason="all steps complete")
        sender.send_stage(conn, FINALIZE, str(task_uuid))
        return final
    return move_task(
        conn, task_uuid, current, *path, TaskState.COMPLETE, reason="all steps complete"
    )

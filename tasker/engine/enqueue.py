"""Find the steps of a task that are ready and enqueue them, in the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row

from tasker.engine.messages import Sender, StepMessage
from tasker.engine.sql import q
from tasker.engine.transitions import move_steps
from tasker.workflow.definition import step_actor_name
from tasker.workflow.states import StepState

__all__ = ["enqueue_ready_steps", "step_messages", "step_queue"]


@dataclass(frozen=True)
class _MovedStep:
    """A step the statement ``enqueue_steps`` moved to ``enqueued``, and the state it left."""

    workflow_step_uuid: Any
    name: str
    from_state: str


_MOVED_STEP = class_row(_MovedStep)


def enqueue_ready_steps(
    conn: Any, sender: Sender, task_uuid: Any, *, namespace: str, workflow: str, version: str
) -> int:
    """Move every ready step to ``enqueued`` and send its message; returns how many.

    The caller holds the task row lock. Readiness is computed in SQL (seed-spec 3.1).
    """
    ready = [row[0] for row in conn.execute(q("ready_steps"), {"task": task_uuid}).fetchall()]
    if not ready:
        return 0
    with conn.cursor(row_factory=_MOVED_STEP) as cursor:
        moved: list[_MovedStep] = cursor.execute(q("enqueue_steps"), {"steps": ready}).fetchall()
    if not moved:
        return 0
    steps = [m.workflow_step_uuid for m in moved]
    move_steps(conn, steps, [m.from_state for m in moved], StepState.ENQUEUED)
    pairs = [(m.workflow_step_uuid, m.name) for m in moved]
    sender.send_steps(conn, step_messages(namespace, workflow, version, task_uuid, pairs))
    return len(moved)


def step_messages(
    namespace: str,
    workflow: str,
    version: str,
    task_uuid: Any,
    steps: Sequence[tuple[Any, str]],
) -> list[StepMessage]:
    """The messages that run ``steps`` (``(step_uuid, name)`` pairs) of a task, addressed to the
    actors of the task's workflow version."""
    queue = step_queue(namespace)
    return [
        StepMessage(
            queue, step_actor_name(namespace, workflow, version, name), str(task_uuid), str(step)
        )
        for step, name in steps
    ]


def step_queue(namespace: str) -> str:
    """The Dramatiq queue of the step messages of ``namespace`` (``worker_<namespace>_queue``)."""
    return f"worker_{namespace}_queue"

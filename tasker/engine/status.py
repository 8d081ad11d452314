"""Read a task's state with every step (for clients, the CLI and the API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasker.engine.sql import q
from tasker.exceptions import StepNotFoundError, TaskNotFoundError

__all__ = ["StepStatus", "TaskStatus", "task_status"]

FINAL_STATES = frozenset({"complete", "error", "cancelled", "resolved_manually"})


@dataclass(frozen=True)
class StepStatus:
    step_uuid: str
    name: str
    state: str
    attempts: int
    max_attempts: int
    result: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    next_retry_at: datetime | None


@dataclass(frozen=True)
class TaskStatus:
    task_uuid: str
    state: str
    namespace: str
    name: str
    version: str
    context: dict[str, Any]
    requested_at: datetime
    completed_at: datetime | None
    correlation_id: str
    priority: int
    steps: tuple[StepStatus, ...]

    @property
    def finished(self) -> bool:
        """True in a final state (complete, error, cancelled, resolved_manually)."""
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "complete"

    def step(self, name: str) -> StepStatus:
        """The step called ``name``."""
        for step in self.steps:
            if step.name == name:
                return step
        names = ", ".join(step.name for step in self.steps)
        raise StepNotFoundError(f"Task {self.task_uuid} has no step {name!r}; its steps: {names}.")


def task_status(conn: Any, task_uuid: Any) -> TaskStatus:
    """The task and all its steps; :class:`TaskNotFoundError` if there is no such task."""
    try:
        uuid.UUID(str(task_uuid))
    except ValueError:
        raise TaskNotFoundError(
            f"{task_uuid!r} is not a task id: task ids are UUIDs, as returned by submit()."
        ) from None
    row = conn.execute(q("task_status"), {"task": task_uuid}).fetchone()
    if row is None:
        raise TaskNotFoundError(f"No task {task_uuid}; check the id returned by submit().")
    rows = conn.execute(q("step_statuses"), {"task": task_uuid}).fetchall()
    steps = tuple(_step_status(*step) for step in rows)
    task, state, namespace, name, version, context, requested, completed, correlation, prio = row
    return TaskStatus(
        str(task),
        state,
        namespace,
        name,
        version,
        context,
        requested,
        completed,
        str(correlation),
        prio,
        steps,
    )


def _step_status(*row: Any) -> StepStatus:
    """A step_statuses row: uuid, name, state, attempts, max_attempts, results, 3 timestamps."""
    step_uuid, name, state, attempts, max_attempts, results, started, finished, retry_at = row
    document = results or {}
    return StepStatus(
        str(step_uuid),
        name,
        state,
        attempts,
        max_attempts,
        document.get("result"),
        document.get("error"),
        started,
        finished,
        retry_at,
    )

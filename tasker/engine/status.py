"""Read a task's state with every step (for clients, the CLI and the API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import q
from tasker.exceptions import StepNotFoundError, TaskNotFoundError
from tasker.workflow.states import TaskState

__all__ = ["StepStatus", "TaskStatus", "task_id", "task_status"]


@dataclass(frozen=True)
class StepStatus:
    """One step of a task as stored.

    ``waiting_for`` says why a step's message waits (no live worker has its handler, during a
    rolling deploy), since ``waiting_since``; both are None otherwise. ``error`` is the last
    failure's document (``message``, ``error_type``, ``retryable``...), None after a success;
    ``depends_on`` names the steps it runs after.
    """

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
    waiting_for: str | None = None
    waiting_since: datetime | None = None
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskStatus:
    """A task with every step (in dependency order); ``finished`` once it is in a final state,
    ``blocked`` while it waits in ``blocked_by_failures`` for a person's decision."""

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
    initiator: str | None = None
    source_system: str | None = None
    reason: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True in a final state (complete, error, cancelled, resolved_manually)."""
        return TaskState(self.state).terminal

    @property
    def blocked(self) -> bool:
        """True in ``blocked_by_failures``: a step failed for good and nothing else can run; a
        manual step action (retry, resolve, complete) or the coordinator's limit decides."""
        return self.state == TaskState.BLOCKED_BY_FAILURES

    @property
    def settled(self) -> bool:
        """True when nothing more happens without a person: final, or :attr:`blocked`."""
        return self.finished or self.blocked

    @property
    def succeeded(self) -> bool:
        """True when the task is ``complete``."""
        return self.state == TaskState.COMPLETE

    def step(self, name: str) -> StepStatus:
        """The step called ``name``; :class:`StepNotFoundError` if the task has none."""
        for step in self.steps:
            if step.name == name:
                return step
        names = ", ".join(step.name for step in self.steps)
        raise StepNotFoundError(f"Task {self.task_uuid} has no step {name!r}; its steps: {names}.")


@dataclass(frozen=True)
class _TaskRow:
    task_uuid: Any
    state: str
    namespace: str
    workflow: str
    version: str
    context: dict[str, Any]
    requested_at: datetime
    completed_at: datetime | None
    correlation_id: Any
    priority: int
    initiator: str | None
    source_system: str | None
    reason: str | None
    tags: dict[str, Any]


@dataclass(frozen=True)
class _StepRow:
    workflow_step_uuid: Any
    name: str
    state: str
    attempts: int
    max_attempts: int
    results: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    next_retry_at: datetime | None
    waiting_for: str | None
    waiting_since: datetime | None
    depends_on: list[str]


def task_id(value: Any) -> str:
    """``value`` as a task id in canonical form (also from ``urn:uuid:...``, ``{...}``, upper
    case); :class:`TaskNotFoundError` when it is not a UUID."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise TaskNotFoundError(
            f"{value!r} is not a task id: task ids are UUIDs (tasker task list shows them)."
        ) from None


def task_status(conn: Any, task_uuid: Any) -> TaskStatus:
    """The task and all its steps; :class:`TaskNotFoundError` if there is no such task."""
    task_uuid = task_id(task_uuid)
    with conn.cursor(row_factory=class_row(_TaskRow)) as cursor:
        task = cursor.execute(q("task_status"), {"task": task_uuid}).fetchone()
    if task is None:
        raise TaskNotFoundError(f"No task {task_uuid}; check the id returned by submit().")
    with conn.cursor(row_factory=class_row(_StepRow)) as cursor:
        steps = cursor.execute(q("step_statuses"), {"task": task_uuid}).fetchall()
    return TaskStatus(
        task_uuid=str(task.task_uuid),
        state=task.state,
        namespace=task.namespace,
        name=task.workflow,
        version=task.version,
        context=task.context,
        requested_at=task.requested_at,
        completed_at=task.completed_at,
        correlation_id=str(task.correlation_id),
        priority=task.priority,
        steps=tuple(_step_status(step) for step in steps),
        initiator=task.initiator,
        source_system=task.source_system,
        reason=task.reason,
        tags=task.tags,
    )


def _step_status(row: _StepRow) -> StepStatus:
    document = row.results or {}
    return StepStatus(
        step_uuid=str(row.workflow_step_uuid),
        name=row.name,
        state=row.state,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        result=document.get("result"),
        error=document.get("error"),
        started_at=row.started_at,
        finished_at=row.finished_at,
        next_retry_at=row.next_retry_at,
        waiting_for=row.waiting_for,
        waiting_since=row.waiting_since,
        depends_on=tuple(row.depends_on),
    )

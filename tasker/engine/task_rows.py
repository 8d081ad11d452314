"""What the orchestration stages read about a task, by column name: its row under the task lock,
and its execution context."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import q
from tasker.workflow.definition import Workflow

__all__ = ["ExecutionContext", "LockedTask", "execution_context", "lock_task"]


@dataclass(frozen=True)
class LockedTask:
    """A task row locked ``FOR UPDATE`` (statement ``lock_task``), with its template's names."""

    task_uuid: Any
    state: str
    namespace: str
    workflow: str
    version: str
    named_task_uuid: Any

    def definition(self, conn: Any) -> Workflow:
        """The task's workflow definition (read only when a failure needs its retry policy)."""
        row = conn.execute(q("template_configuration"), {"named_task": self.named_task_uuid})
        configuration = row.fetchone()[0]
        return Workflow.from_template(configuration, resolve_handlers=False, register=False)


@dataclass(frozen=True)
class ExecutionContext:
    """A task's progress (``tasker.task_execution_context_v2``); ``execution_status`` is an
    :class:`~tasker.engine.sql_outcomes.ExecutionStatus` value."""

    execution_status: str
    next_retry_at: datetime | None
    total: int
    completed: int
    failed: int


_LOCKED_TASK = class_row(LockedTask)
_EXECUTION_CONTEXT = class_row(ExecutionContext)


def lock_task(conn: Any, task_uuid: Any) -> LockedTask | None:
    """Lock the task's row until the transaction ends (None: no such task)."""
    with conn.cursor(row_factory=_LOCKED_TASK) as cursor:
        row: LockedTask | None = cursor.execute(q("lock_task"), {"task": task_uuid}).fetchone()
    return row


def execution_context(conn: Any, task_uuid: Any) -> ExecutionContext:
    """The task's execution context: what its steps say it should do next."""
    with conn.cursor(row_factory=_EXECUTION_CONTEXT) as cursor:
        row: ExecutionContext = cursor.execute(
            q("execution_context"), {"task": task_uuid}
        ).fetchone()
    return row

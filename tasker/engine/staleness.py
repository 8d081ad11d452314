"""Staleness detection and the task DLQ (seed-spec 10.4).

A task that is not final but has shown no activity (a task transition, a step starting or
finishing) in its state for longer than the limit for that state, or that is older than its
maximum lifetime, is given up: in one transaction it gets a ``tasks_dlq`` row holding a snapshot
of the task and its steps and the reason, and moves to ``error``. Limits come from the template's
``lifecycle`` (``max_steps_in_process_minutes``, ``max_waiting_for_retry_minutes``,
``max_waiting_for_dependencies_minutes``, ``max_blocked_by_failures_minutes``,
``max_duration_minutes``), else from the settings. A task waiting in ``blocked_by_failures`` for
a person's decision past its limit goes the same way, with the DLQ reason
``max_retries_exceeded``.

Operators work the DLQ with :func:`list_dlq`, :func:`get_dlq_entry` and :func:`resolve_dlq_entry`
(``tasker dlq tasks list|show|resolve``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import cq, q
from tasker.engine.task_rows import lock_task
from tasker.exceptions import DlqEntryNotFoundError, PayloadError
from tasker.workflow.states import TaskState, check_give_up

__all__ = [
    "DLQ_RESOLUTIONS",
    "DlqEntry",
    "DlqStats",
    "StalenessLimits",
    "dlq_stale_tasks",
    "dlq_stats",
    "get_dlq_entry",
    "list_dlq",
    "resolve_dlq_entry",
]

logger = logging.getLogger(__name__)

#: How an operator may close a DLQ entry.
DLQ_RESOLUTIONS = ("manually_resolved", "permanently_failed", "cancelled")


@dataclass(frozen=True)
class StalenessLimits:
    """Default limits in minutes (the seed's defaults: 30 / 30 / 60 minutes, 24 hours)."""

    steps_in_process: int = 30
    waiting_for_retry: int = 30
    waiting_for_dependencies: int = 60
    blocked_by_failures: int = 60
    lifetime: int = 24 * 60


@dataclass(frozen=True)
class _Stale:
    task_uuid: Any
    state: str
    idle_minutes: float
    age_minutes: float
    state_limit: int | None
    lifetime_limit: int
    why: str


@dataclass(frozen=True)
class DlqEntry:
    """One row of ``tasker.tasks_dlq``."""

    dlq_entry_uuid: Any
    task_uuid: Any
    original_state: str
    dlq_reason: str
    dlq_timestamp: datetime
    resolution_status: str
    resolution_timestamp: datetime | None
    resolution_notes: str | None
    resolved_by: str | None
    namespace: str | None = None
    task_name: str | None = None
    task_snapshot: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


def dlq_stale_tasks(
    conn: Any, limits: StalenessLimits, *, limit: int, coordinator: str
) -> list[str]:
    """Move stale tasks to the DLQ and ``error``, each in its own transaction; their ids."""
    params = {
        "steps_in_process": limits.steps_in_process,
        "waiting_for_retry": limits.waiting_for_retry,
        "waiting_for_dependencies": limits.waiting_for_dependencies,
        "blocked_by_failures": limits.blocked_by_failures,
        "lifetime": limits.lifetime,
        "limit": limit,
    }
    with conn.cursor(row_factory=class_row(_Stale)) as cursor:
        stale = cursor.execute(cq("stale_tasks"), params).fetchall()
    moved = []
    for task in stale:
        if _dlq_one(conn, task, coordinator):
            moved.append(str(task.task_uuid))
    return moved


def _dlq_one(conn: Any, task: _Stale, coordinator: str) -> bool:
    with conn.transaction():
        locked = lock_task(conn, task.task_uuid)
        if locked is None or locked.state != task.state:
            return False  # it moved meanwhile: not stale any more
        snapshot = conn.execute(cq("dlq_snapshot"), {"task": task.task_uuid}).fetchone()[0]
        limit = task.lifetime_limit if task.why == "max_lifetime" else task.state_limit
        minutes = task.age_minutes if task.why == "max_lifetime" else task.idle_minutes
        snapshot.update(time_in_state_minutes=round(minutes, 1), threshold_minutes=limit)
        metadata = {"detection_method": "automatic_staleness", "why": task.why}
        entry = conn.execute(
            cq("insert_dlq_entry"),
            {
                "task": task.task_uuid,
                "state": task.state,
                "reason": _dlq_reason(task),
                "snapshot": json.dumps(snapshot, default=str),
                "metadata": json.dumps(metadata),
            },
        ).fetchone()
        if entry is None:
            return False
        _give_up(conn, task, limit, minutes)
        conn.execute(
            cq("record_action"),
            {
                "action": "dlq_stale_task",
                "task": task.task_uuid,
                "step": None,
                "detail": json.dumps({**metadata, "state": task.state, "limit": limit}),
                "coordinator": coordinator,
            },
        )
    logger.warning(
        "Task %s was %s with no activity (no decision) for %.0f min (limit %s): moved to the "
        "task DLQ and error",
        task.task_uuid,
        task.state,
        minutes,
        limit,
    )
    return True


def _give_up(conn: Any, task: _Stale, limit: int | None, minutes: float) -> None:
    """``<state> -> error`` (the state machine's "give up" move, decision 0008)."""
    target = check_give_up(task.state)
    conn.execute(q("set_task_state"), {"task": task.task_uuid, "to": target})
    metadata = {
        "reason": _dlq_reason(task),
        "why": task.why,
        "limit_minutes": limit,
        "minutes": round(minutes, 1),
    }
    conn.execute(
        q("record_task_transition"),
        {
            "task": task.task_uuid,
            "from": task.state,
            "to": target,
            "metadata": json.dumps(metadata),
        },
    )


def _dlq_reason(task: _Stale) -> str:
    """``max_retries_exceeded`` for a task that waited too long in ``blocked_by_failures`` for a
    decision about its failed steps (seed-spec 10.4's DLQ reasons), else ``staleness_timeout``."""
    if task.state == TaskState.BLOCKED_BY_FAILURES and task.why == "time_in_state":
        return "max_retries_exceeded"
    return "staleness_timeout"


def list_dlq(
    conn: Any,
    *,
    status: str | None = "pending",
    limit: int = 50,
    task_uuid: str | None = None,
    namespaces: Sequence[str] | None = None,
) -> list[DlqEntry]:
    """DLQ entries, newest first (``status`` None: every status), of one task if ``task_uuid``,
    of tasks in ``namespaces`` if given. Raises :class:`DlqEntryNotFoundError` for a
    ``task_uuid`` that is not a UUID."""
    if task_uuid is not None:
        _check_uuid(task_uuid, what="task id")
    params = {
        "status": status,
        "limit": limit,
        "task": task_uuid,
        "namespaces": list(namespaces) if namespaces is not None else None,
    }
    with conn.cursor(row_factory=class_row(DlqEntry)) as cursor:
        return list(cursor.execute(cq("list_dlq_entries"), params))


@dataclass(frozen=True)
class DlqStats:
    """How many DLQ entries have one reason and resolution status, and their time span."""

    dlq_reason: str
    resolution_status: str
    entries: int
    oldest: datetime
    newest: datetime


def dlq_stats(conn: Any, *, namespaces: Sequence[str] | None = None) -> list[DlqStats]:
    """The DLQ's entries counted per reason and resolution status (of ``namespaces`` if given)."""
    params = {"namespaces": list(namespaces) if namespaces is not None else None}
    with conn.cursor(row_factory=class_row(DlqStats)) as cursor:
        return list(cursor.execute(cq("dlq_stats"), params))


def get_dlq_entry(conn: Any, entry_uuid: str) -> DlqEntry:
    """One DLQ entry with its snapshot; :class:`DlqEntryNotFoundError` if there is none."""
    _check_uuid(entry_uuid)
    with conn.cursor(row_factory=class_row(DlqEntry)) as cursor:
        entry = cursor.execute(cq("get_dlq_entry"), {"entry": entry_uuid}).fetchone()
    if entry is None:
        raise DlqEntryNotFoundError(f"No task DLQ entry {entry_uuid}; see `tasker dlq tasks list`.")
    return entry  # type: ignore[no-any-return]


def resolve_dlq_entry(
    conn: Any, entry_uuid: str, *, status: str, notes: str | None, by: str | None
) -> None:
    """Close a pending DLQ entry with ``status`` (one of :data:`DLQ_RESOLUTIONS`)."""
    _check_uuid(entry_uuid)
    if status not in DLQ_RESOLUTIONS:
        raise PayloadError(
            f"Resolution {status!r} is unknown; use one of {', '.join(DLQ_RESOLUTIONS)}."
        )
    params = {"entry": entry_uuid, "status": status, "notes": notes, "by": by}
    if conn.execute(cq("resolve_dlq_entry"), params).fetchone() is None:
        get_dlq_entry(conn, entry_uuid)  # raises when it does not exist
        raise DlqEntryNotFoundError(f"Task DLQ entry {entry_uuid} is already resolved.")


def _check_uuid(value: str, what: str = "DLQ entry id") -> None:
    try:
        uuid.UUID(str(value))
    except ValueError:
        raise DlqEntryNotFoundError(
            f"{value!r} is not a {what} (a UUID, as `tasker dlq tasks list` shows)."
        ) from None

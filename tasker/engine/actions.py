"""What an operator does to a workflow: cancel a task, and retry, resolve or complete a step.

Each action is one transaction: the state change (``tasker.cancel_task_v1`` or
``tasker.manual_step_action_v1``), its audit (the transition rows carry ``action``, ``by`` and
``reason``) and what follows from it commit together.

* :func:`cancel_task`: the task is ``cancelled`` at once and its steps that do not run are
  ``cancelled``; no step starts after the commit (a claim of a final task's step is refused), a
  step running at that moment may finish and is recorded, but the task does not move again. The
  task's queued messages are removed in the same transaction.
* :func:`act_on_step`: ``retry`` (``error -> pending`` with attempts back to 0), ``resolve``
  (``resolved_manually``: dependents proceed without its result) or ``complete`` (``complete``
  with a result the operator supplies, checked by the payload rules). A task waiting in
  ``blocked_by_failures`` or given up in ``error`` is reopened and moved forward: the steps that
  became ready are enqueued, or the task is finalized.

The manual actions and their names follow seed-spec 2.2 and 9.1 (``reset_for_retry``,
``resolve_manually``, ``complete_manually``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.enqueue import step_queue
from tasker.engine.messages import STAGES, Sender
from tasker.engine.results import advance_task
from tasker.engine.sql import q
from tasker.engine.sql_outcomes import CancelOutcome, ManualAction, ManualOutcome
from tasker.engine.status import task_id
from tasker.engine.task_rows import lock_task
from tasker.exceptions import (
    ActionNotAllowedError,
    ConfigurationError,
    StepNotFoundError,
    TaskNotFoundError,
)
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES, check_payload, dump_json, payload_problem

__all__ = [
    "ActionResult",
    "AuditEntry",
    "CancelResult",
    "ManualAction",
    "act_on_step",
    "cancel_task",
    "find_step",
    "step_audit",
    "task_audit",
]

#: Longest ``by`` and ``reason`` stored with an action, in characters.
MAX_ACTOR_CHARS = 128
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class CancelResult:
    """A cancelled task: the steps cancelled, the steps still running (they may finish and are
    recorded; the task stays cancelled) and how many queued messages were removed."""

    task_uuid: str
    state: str
    cancelled_steps: tuple[str, ...]
    running_steps: tuple[str, ...]
    messages_removed: int


@dataclass(frozen=True)
class ActionResult:
    """A manual step action done: the step's new state and the task's state after it moved
    forward (``reopened``: the task was in ``blocked_by_failures`` or ``error``)."""

    task_uuid: str
    step_uuid: str
    action: str
    step_state: str
    task_state: str
    reopened: bool


@dataclass(frozen=True)
class AuditEntry:
    """One transition of a step or a task, newest first: ``metadata`` holds the attempt, the
    engine's reason, and for an operator's action its ``action``, ``by`` and ``reason``."""

    transition_uuid: str
    from_state: str | None
    to_state: str
    metadata: dict[str, Any]
    created_at: datetime

    @property
    def action(self) -> str | None:
        """The operator's action (``cancel``, ``retry``, ``resolve``, ``complete``), if any."""
        value = self.metadata.get("action")
        return str(value) if value is not None else None

    @property
    def by(self) -> str | None:
        """Who took the operator's action."""
        value = self.metadata.get("by")
        return str(value) if value is not None else None

    @property
    def reason(self) -> str | None:
        """Why: the operator's reason, or the engine's."""
        value = self.metadata.get("reason")
        return str(value) if value is not None else None


@dataclass(frozen=True)
class _CancelRow:
    outcome: str
    state: str | None
    namespace: str | None
    cancelled_steps: list[Any] | None
    running_steps: list[Any] | None


@dataclass(frozen=True)
class _ManualRow:
    outcome: str
    task_state: str | None
    step_state: str | None
    reopened: bool


@dataclass(frozen=True)
class _AuditRow:
    transition_uuid: Any
    from_state: str | None
    to_state: str
    metadata: dict[str, Any]
    created_at: datetime


def cancel_task(conn: Any, sender: Sender, task_uuid: str, *, by: str, reason: str) -> CancelResult:
    """Cancel the task now, in one transaction (see the module docstring).

    Raises :class:`TaskNotFoundError` (no such task) and :class:`ActionNotAllowedError` when the
    task is final already (its ``state`` is on the error).
    """
    task = task_id(task_uuid)
    params = {"task": task, "by": _text(by, "by", MAX_ACTOR_CHARS), "reason": _reason(reason)}
    with conn.transaction():
        with conn.cursor(row_factory=class_row(_CancelRow)) as cursor:
            row: _CancelRow = cursor.execute(q("cancel_task"), params).fetchone()
        outcome = CancelOutcome(row.outcome)
        if outcome is CancelOutcome.MISSING:
            raise TaskNotFoundError(f"No task {task}; check the id (tasker task list).")
        if outcome is CancelOutcome.FINAL:
            raise ActionNotAllowedError(
                f"Task {task} is {row.state} already; only a task that is not final can be "
                "cancelled.",
                state=row.state,
            )
        running = tuple(str(step) for step in row.running_steps or ())
        queues = [step_queue(str(row.namespace)), *(stage.queue for stage in STAGES)]
        removed = sender.withdraw_task(conn, queues, task, keep=running)
    return CancelResult(
        task_uuid=task,
        state=str(row.state),
        cancelled_steps=tuple(str(step) for step in row.cancelled_steps or ()),
        running_steps=running,
        messages_removed=removed,
    )


def act_on_step(
    conn: Any,
    sender: Sender,
    task_uuid: str,
    step: str,
    action: ManualAction | str,
    *,
    by: str,
    reason: str,
    result: Any = None,
    max_result_bytes: int = MAX_PAYLOAD_BYTES,
) -> ActionResult:
    """Take a manual action on the task's ``step`` (its name or its id), in one transaction.

    ``result`` is the value dependents will read, for ``complete`` only (any JSON value the
    payload rules accept, at most ``max_result_bytes`` bytes of JSON).

    Raises :class:`TaskNotFoundError`, :class:`StepNotFoundError`,
    :class:`~tasker.exceptions.PayloadError` (a result that cannot be stored) and
    :class:`ActionNotAllowedError` (the task is final, the step runs now, or its state does not
    allow the action; the message says what can be done instead).
    """
    chosen = _action(action)
    task = task_id(task_uuid)
    document = None
    if chosen is ManualAction.COMPLETE:
        check_payload(result, "result")
        document = _manual_document(dump_json(result, "the result", limit=max_result_bytes), by)
    elif result is not None:
        raise ConfigurationError(
            f"A result is supplied only with the complete action, not with {chosen.value}."
        )
    params = {
        "task": task,
        "action": chosen.value,
        "results": document,
        "by": _text(by, "by", MAX_ACTOR_CHARS),
        "reason": _reason(reason),
    }
    with conn.transaction():
        step_uuid = find_step(conn, task, step)
        with conn.cursor(row_factory=class_row(_ManualRow)) as cursor:
            row: _ManualRow = cursor.execute(
                q("manual_step_action"), {**params, "step": step_uuid}
            ).fetchone()
        _check_manual(ManualOutcome(row.outcome), row, task, step, chosen)
        task_state = str(row.task_state)
        locked = lock_task(conn, task)
        assert locked is not None  # the function above found and locked it
        moved = advance_task(conn, sender, locked)
        if moved is not None:
            task_state = moved
    return ActionResult(
        task_uuid=task,
        step_uuid=step_uuid,
        action=chosen.value,
        step_state=str(row.step_state),
        task_state=task_state,
        reopened=row.reopened,
    )


def find_step(conn: Any, task_uuid: str, step: str) -> str:
    """The id of the task's step given by name or by id; :class:`TaskNotFoundError` or
    :class:`StepNotFoundError` naming the task's steps."""
    rows = conn.execute(q("task_step_names"), {"task": task_uuid}).fetchall()
    if not rows:  # every task has a step
        raise TaskNotFoundError(f"No task {task_uuid}; check the id (tasker task list).")
    try:  # a step id in any form uuid.UUID reads (upper case, urn:uuid:...)
        wanted = str(uuid.UUID(step))
    except ValueError:
        wanted = step
    for step_uuid, name in rows:
        if step == name or wanted == step_uuid:
            return str(step_uuid)
    names = ", ".join(name for _, name in rows)
    raise StepNotFoundError(f"Task {task_uuid} has no step {step!r}; its steps: {names}.")


def step_audit(conn: Any, task_uuid: str, step: str) -> list[AuditEntry]:
    """Every transition of the task's ``step`` (name or id), newest first."""
    step_uuid = find_step(conn, task_id(task_uuid), step)
    return _audit(conn, "step_audit", {"step": step_uuid})


def task_audit(conn: Any, task_uuid: str) -> list[AuditEntry]:
    """Every transition of the task, newest first; :class:`TaskNotFoundError` if none."""
    entries = _audit(conn, "task_audit", {"task": task_id(task_uuid)})
    if not entries:
        raise TaskNotFoundError(f"No task {task_uuid}; check the id (tasker task list).")
    return entries


def _audit(conn: Any, statement: str, params: dict[str, Any]) -> list[AuditEntry]:
    with conn.cursor(row_factory=class_row(_AuditRow)) as cursor:
        rows = cursor.execute(q(statement), params).fetchall()
    return [
        AuditEntry(str(r.transition_uuid), r.from_state, r.to_state, r.metadata, r.created_at)
        for r in rows
    ]


def _check_manual(
    outcome: ManualOutcome, row: _ManualRow, task: str, step: str, action: ManualAction
) -> None:
    if outcome is ManualOutcome.DONE:
        return
    if outcome is ManualOutcome.MISSING:  # find_step saw it: it went in between
        raise StepNotFoundError(f"Task {task} has no step {step!r} any more.")
    if outcome is ManualOutcome.TASK_FINAL:
        raise ActionNotAllowedError(
            f"Task {task} is {row.task_state}: a final task's steps cannot be changed; to run "
            "the work again, submit a new task.",
            state=row.task_state,
        )
    if outcome is ManualOutcome.STEP_RUNNING:
        raise ActionNotAllowedError(
            f"Step {step!r} of task {task} is running now; wait for its attempt to end "
            "(tasker task wait) or cancel the task.",
            state=row.step_state,
        )
    hint = {
        ManualAction.RETRY: "only a step in error can be retried; resolve or complete it instead",
        ManualAction.RESOLVE: "it is done already",
        ManualAction.COMPLETE: "it is done already",
    }[action]
    raise ActionNotAllowedError(
        f"Step {step!r} of task {task} is {row.step_state}: {hint}.", state=row.step_state
    )


def _manual_document(result_json: str, by: str) -> str:
    """The stored document of a manually completed step (seed-spec 9.1: a success without an
    error, so dependents read ``result``)."""
    metadata = json.dumps({"manual": True, "by": by, "attempt": None, "retryable": False})
    return f'{{"success":true,"result":{result_json},"error":null,"metadata":{metadata}}}'


def _action(action: ManualAction | str) -> ManualAction:
    try:
        return ManualAction(action)
    except ValueError:
        known = ", ".join(a.value for a in ManualAction)
        raise ConfigurationError(f"Unknown step action {action!r}; use one of: {known}.") from None


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what} must be a non-empty string (who takes the action).")
    return _stored_text(value, what, limit)


def _reason(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigurationError(f"reason must be a string, not {type(value).__name__}.")
    return _stored_text(value, "reason", MAX_REASON_CHARS)


def _stored_text(value: str, what: str, limit: int) -> str:
    """``value`` if PostgreSQL stores it as given: at most ``limit`` characters, no NUL, no lone
    surrogate."""
    if len(value) > limit:
        raise ConfigurationError(f"{what} must be at most {limit} characters, not {len(value)}.")
    problem = payload_problem(value)
    if problem is not None:
        raise ConfigurationError(f"{what}: {problem[1]}")
    return value

"""Persist checked state changes: the row's state plus one audit row per net change."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tasker.engine.sql import q
from tasker.workflow.states import StepState, TaskState, check_step_path, check_task_path

__all__ = ["move_steps", "move_task"]


def move_task(
    conn: Any, task_uuid: Any, current: TaskState, *path: TaskState, reason: str = ""
) -> str:
    """Move a task along ``path`` (validated hop by hop); one audit row for the net change.

    Intermediate states inside one transaction are never visible to anyone, so only the net
    change is written, with the path in its metadata. Returns the final state's name.
    """
    final = check_task_path(current, *path)
    if final != current:
        conn.execute(q("set_task_state"), {"task": task_uuid, "to": final})
        metadata = json.dumps({"via": list(path), "reason": reason})
        conn.execute(
            q("record_task_transition"),
            {"task": task_uuid, "from": current, "to": final, "metadata": metadata},
        )
    return final.value


def move_steps(
    conn: Any, steps: Sequence[Any], from_states: Sequence[str], to: StepState, **metadata: Any
) -> None:
    """Record transitions of steps whose row state was already changed to ``to``."""
    if not steps:
        return
    for state in set(from_states):
        retried = state == StepState.WAITING_FOR_RETRY and to == StepState.ENQUEUED
        via = (StepState.PENDING, to) if retried else (to,)
        check_step_path(state, *via)
    conn.execute(
        q("record_step_transitions"),
        {
            "steps": list(steps),
            "from": list(from_states),
            "to": to,
            "metadata": json.dumps(metadata, default=str),
        },
    )

"""What the engine sends, and the interface of whoever sends it (a broker, in one transaction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "FINALIZE",
    "PROCESS_RESULT",
    "STAGES",
    "STEP_ENQUEUE",
    "TASK_REQUEST",
    "OrchestrationStage",
    "Sender",
    "StepMessage",
]


@dataclass(frozen=True)
class OrchestrationStage:
    """An orchestration stage: its Dramatiq queue and actor."""

    queue: str
    actor: str


TASK_REQUEST = OrchestrationStage("orchestration_task_requests", "tasker.task_request")
STEP_ENQUEUE = OrchestrationStage("orchestration_step_enqueue", "tasker.enqueue_steps")
PROCESS_RESULT = OrchestrationStage("orchestration_step_results", "tasker.process_step_result")
FINALIZE = OrchestrationStage("orchestration_task_finalizations", "tasker.finalize_task")
#: Every orchestration stage (their messages carry the task id first).
STAGES = (TASK_REQUEST, STEP_ENQUEUE, PROCESS_RESULT, FINALIZE)


@dataclass(frozen=True)
class StepMessage:
    """The minimal message that runs one step: three ids, everything else is in the database."""

    queue: str
    actor: str
    task_uuid: str
    step_uuid: str


class Sender(Protocol):
    """Sends messages on the caller's connection, so they commit with the state change."""

    def send_steps(self, conn: Any, steps: Sequence[StepMessage]) -> None: ...

    def send_stage(
        self, conn: Any, stage: OrchestrationStage, *args: Any, delay_ms: int = 0
    ) -> None: ...

    def withdraw_task(
        self, conn: Any, queues: Sequence[str], task_uuid: str, *, keep: Sequence[str] = ()
    ) -> int: ...

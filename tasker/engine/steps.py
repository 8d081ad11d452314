"""The worker side of a step: claim it, run its handler, record the outcome.

The claim is a compare-and-swap ``enqueued -> in_progress`` with ``attempts + 1`` that also reads
the task context and the results of every completed ancestor. The outcome is recorded fenced by
the attempt number, so a worker that lost the step to a re-claim records nothing. Recording the
outcome, processing it (inline mode) and acknowledging the queue message are one transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from tasker.engine.enqueue import step_messages
from tasker.engine.messages import FINALIZE, PROCESS_RESULT, Sender
from tasker.engine.outcomes import StepOutcome, run_handler
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.sql import q
from tasker.engine.transitions import move_steps
from tasker.workflow.definition import StepContext

__all__ = [
    "Claim",
    "Connect",
    "Delivery",
    "StepRunner",
    "claim_step",
    "execute_step",
    "record_exhausted",
    "record_outcome",
]

logger = logging.getLogger(__name__)


Connect = Callable[[], AbstractContextManager[Any]]


class Delivery(Protocol):
    """The queue message that asked for a step run, as the engine needs to see it."""

    @property
    def redelivered(self) -> bool:
        """True when an earlier delivery of this message was not settled (its worker died)."""
        ...

    def settle_in(self, conn: Any) -> None:
        """Remove the message inside ``conn``'s open transaction (it commits with the outcome)."""
        ...

    def mark_settled(self) -> None:
        """After that commit: the broker must not acknowledge the message again."""
        ...


@dataclass(frozen=True)
class StepRunner:
    """What is fixed per step actor: whose step it is, its handler, how results are processed."""

    namespace: str
    workflow: str
    handler: Callable[[StepContext], Any]
    inline: bool = True


@dataclass(frozen=True)
class Claim:
    """The result of trying to claim a step: a context to run, or why not."""

    context: StepContext | None
    skipped: str = ""
    exhausted: bool = False


def claim_step(
    conn: Any, namespace: str, workflow: str, task_uuid: str, step_uuid: str, *, redelivered: bool
) -> Claim:
    """Claim the step for this worker: one statement (``tasker.claim_step_v1``)."""
    row = conn.execute(q("claim_step"), {"step": step_uuid, "redelivered": redelivered}).fetchone()
    outcome, state, attempt, max_attempts, name, inputs, task_context, correlation, parents = row
    if outcome == "missing":
        return Claim(None, "step does not exist")
    if outcome == "exhausted":  # its worker died on the last allowed attempt
        return Claim(None, "attempts exhausted by dead workers", exhausted=True)
    if outcome == "skipped":
        return Claim(None, f"step is {state}")
    if state == "in_progress":
        logger.warning("Re-claimed step %s: its previous worker died", step_uuid)
    context = StepContext(
        task_uuid=task_uuid,
        step_uuid=step_uuid,
        step_name=name,
        namespace=namespace,
        workflow=workflow,
        task_context=task_context,
        parent_results=parents,
        inputs=inputs,
        attempt=attempt,
        max_attempts=max_attempts,
        correlation_id=str(correlation),
    )
    return Claim(context)


def execute_step(
    runner: StepRunner,
    connect: Connect,
    sender: Sender,
    *,
    task_uuid: str,
    step_uuid: str,
    delivery: Delivery,
) -> None:
    """The whole step sequence for one delivery: claim, run the handler, record, settle.

    ``connect()`` lends a connection (a pool's ``connection``); the handler runs outside any
    transaction; the outcome, its processing (inline mode) and the message's removal commit
    together.
    """
    with connect() as conn:
        claim = claim_step(
            conn,
            runner.namespace,
            runner.workflow,
            task_uuid,
            step_uuid,
            redelivered=delivery.redelivered,
        )
        if claim.exhausted:
            with conn.transaction():
                record_exhausted(conn, sender, step_uuid, inline=runner.inline)
                delivery.settle_in(conn)
            delivery.mark_settled()
            return
    if claim.context is None:
        logger.info("Skipping step %s: %s", step_uuid, claim.skipped)
        return
    outcome = run_handler(runner.handler, claim.context)
    with connect() as conn, conn.transaction():
        record_outcome(
            conn, sender, step_uuid, claim.context.attempt, outcome, inline=runner.inline
        )
        delivery.settle_in(conn)
    delivery.mark_settled()


def record_outcome(
    conn: Any,
    sender: Sender,
    step_uuid: str,
    attempt: int,
    outcome: StepOutcome,
    *,
    inline: bool,
) -> bool:
    """Store the outcome and process it (inline) or hand it on; False if the step was lost."""
    if outcome.success and inline:
        return _complete_inline(conn, sender, step_uuid, attempt, outcome)
    to = "enqueued_for_orchestration" if outcome.success else "enqueued_as_error_for_orchestration"
    row = conn.execute(
        q("finish_step"),
        {"step": step_uuid, "to": to, "results": outcome.document, "attempt": attempt},
    ).fetchone()
    if row is None:
        logger.warning(
            "Step %s attempt %d lost its claim; its outcome is dropped", step_uuid, attempt
        )
        return False
    move_steps(conn, [step_uuid], ["in_progress"], to, attempt=attempt)
    _hand_on(conn, sender, row[0], step_uuid, inline=inline)
    return True


def _complete_inline(
    conn: Any, sender: Sender, step_uuid: str, attempt: int, outcome: StepOutcome
) -> bool:
    """The fast path of a success: one call of ``tasker.complete_step_v1``, then the messages."""
    params = {"step": step_uuid, "attempt": attempt, "results": outcome.document}
    result, task_uuid, namespace, workflow, steps, names = conn.execute(
        q("complete_step_fast"), params
    ).fetchone()
    if result == "lost":
        logger.warning(
            "Step %s attempt %d lost its claim; its outcome is dropped", step_uuid, attempt
        )
        return False
    if result == "enqueued":
        sender.send_steps(
            conn,
            step_messages(namespace, workflow, task_uuid, list(zip(steps, names, strict=True))),
        )
    elif result == "finalize":
        sender.send_stage(conn, FINALIZE, str(task_uuid))
    elif result == "evaluate":  # the general path, with the task row already locked
        reevaluate_task(conn, sender, task_uuid)
    return True


def record_exhausted(conn: Any, sender: Sender, step_uuid: str, *, inline: bool) -> None:
    """A step whose workers died on every allowed attempt fails permanently."""
    document = json.dumps(
        {
            "success": False,
            "result": None,
            "error": {
                "message": "the worker running this step died on its last allowed attempt",
                "error_type": "worker_died",
                "retryable": False,
            },
            "metadata": {"retryable": False},
        }
    )
    row = conn.execute(
        q("fail_step_without_run"), {"step": step_uuid, "results": document}
    ).fetchone()
    if row is not None:
        move_steps(conn, [step_uuid], ["in_progress"], "enqueued_as_error_for_orchestration")
        _hand_on(conn, sender, row[0], step_uuid, inline=inline)


def _hand_on(conn: Any, sender: Sender, task_uuid: Any, step_uuid: str, *, inline: bool) -> None:
    if inline:
        process_result(conn, sender, task_uuid, step_uuid)
    else:
        sender.send_stage(conn, PROCESS_RESULT, str(task_uuid), step_uuid)

"""The worker side of a step: claim it, run its handler, record the outcome.

The claim is a compare-and-swap ``enqueued -> in_progress`` with ``attempts + 1`` that also reads
the task context and the results of every completed ancestor. The outcome is recorded fenced by
the attempt number, so a worker that lost the step to a re-claim records nothing. Recording the
outcome, processing it (inline mode) and acknowledging the queue message are one transaction.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasker.engine.enqueue import step_messages
from tasker.engine.messages import FINALIZE, PROCESS_RESULT, Sender
from tasker.engine.payloads import encode_json
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.sql import q
from tasker.engine.transitions import move_steps
from tasker.exceptions import PayloadError
from tasker.workflow.definition import PermanentError, RetryableError, StepContext

__all__ = ["Claim", "StepOutcome", "claim_step", "record_outcome", "run_handler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """The result of trying to claim a step: a context to run, or why not."""

    context: StepContext | None
    skipped: str = ""
    exhausted: bool = False


@dataclass(frozen=True)
class StepOutcome:
    """What a handler produced, as stored in ``workflow_steps.results``."""

    success: bool
    document: str


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


def run_handler(handler: Callable[[StepContext], Any], context: StepContext) -> StepOutcome:
    """Run the handler and turn its return value or exception into a stored outcome."""
    try:
        value = handler(context)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        return StepOutcome(True, _document(True, value, None, context))
    except RetryableError as exc:
        error = _error(exc, retryable=True, retry_after=exc.retry_after)
    except PermanentError as exc:
        error = _error(exc, retryable=False)
    except Exception as exc:  # any other exception is a retryable failure (seed-spec 9.5)
        error = _error(exc, retryable=True)
    except BaseException as exc:  # Dramatiq's TimeLimitExceeded and Shutdown are BaseException
        if type(exc).__name__ not in ("TimeLimitExceeded", "Shutdown"):
            raise
        error = _error(exc, retryable=True, error_type="timeout")
    return StepOutcome(False, _document(False, None, error, context))


async def _await(value: Any) -> Any:
    return await value


def _error(
    exc: BaseException,
    *,
    retryable: bool,
    retry_after: float | None = None,
    error_type: str | None = None,
) -> dict[str, Any]:
    return {
        "message": str(exc) or type(exc).__name__,
        "error_type": error_type or type(exc).__name__,
        "retryable": retryable,
        "retry_after": retry_after,
        "backtrace": traceback.format_exception(exc)[-20:],
    }


def _document(success: bool, value: Any, error: dict[str, Any] | None, context: StepContext) -> str:
    document = {
        "success": success,
        "result": value,
        "error": error,
        "metadata": {"attempt": context.attempt, "retryable": bool(error and error["retryable"])},
    }
    try:
        return encode_json(document, f"result of step {context.step_name!r}")
    except PayloadError as exc:
        failure = {"message": str(exc), "error_type": "PayloadError", "retryable": False}
        document.update(success=False, result=None, error=failure)
        document["metadata"] = {"attempt": context.attempt, "retryable": False}
        return json.dumps(document)


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

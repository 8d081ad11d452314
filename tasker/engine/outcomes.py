"""Run a step's handler and turn what it returned or raised into the document stored for it."""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasker.engine.payloads import encode_json
from tasker.exceptions import PayloadError
from tasker.workflow.definition import PermanentError, RetryableError, StepContext

__all__ = ["StepOutcome", "run_handler"]


@dataclass(frozen=True)
class StepOutcome:
    """What a handler produced, as stored in ``workflow_steps.results``."""

    success: bool
    document: str


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

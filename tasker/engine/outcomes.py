"""Run a step's handler and turn whatever it returned or raised into the document stored for it.

This is total: every return value and every exception a handler can produce, ``BaseException``
included, becomes a :class:`StepOutcome` whose document PostgreSQL's jsonb accepts.

* A returned value is stored as the step's result when it passes the payload rules
  (:mod:`tasker.workflow.payloads`); otherwise the step fails permanently with error
  type ``payload_error``, naming where in the value the problem is.
* ``RetryableError`` (with its ``retry_after``) and any other ``Exception`` are retryable failures,
  ``PermanentError`` is not (seed-spec 9.5: the error type is the exception's class name).
* A timeout (Dramatiq's time limit for sync handlers, the step's own deadline for ``async def``
  handlers) is a retryable ``handler_timeout``; a Dramatiq shutdown notification a retryable
  ``worker_shutdown``.
* ``SystemExit``, ``KeyboardInterrupt`` and any other ``BaseException`` are retryable failures too:
  a handler cannot stop a worker.
* A step's circuit breaker counts an exception (``RetryableError`` included, ``PermanentError``
  not: the handler judged its input) and a timeout (``trips_breaker``); a payload error, a
  shutdown or another ``BaseException`` says nothing about the downstream the breaker guards.

Error documents are built defensively: an exception whose ``__str__`` raises, a message with a NUL
character or a lone surrogate, or a huge traceback still give a storable document.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasker.workflow.definition import PermanentError, RetryableError, StepContext
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES, check_payload, dump_json

__all__ = [
    "HANDLER_TIMEOUT",
    "OUTCOME_NOT_RECORDABLE",
    "PAYLOAD_ERROR",
    "WORKER_DIED",
    "WORKER_SHUTDOWN",
    "StepOutcome",
    "StepTimeoutError",
    "refused_outcome",
    "run_handler",
    "worker_died_outcome",
]

logger = logging.getLogger(__name__)

HANDLER_TIMEOUT = "handler_timeout"
WORKER_SHUTDOWN = "worker_shutdown"
PAYLOAD_ERROR = "payload_error"
WORKER_DIED = "worker_died"
OUTCOME_NOT_RECORDABLE = "outcome_not_recordable"

_MAX_MESSAGE_CHARS = 4_000
_MAX_INTERRUPTS = 3  # Dramatiq's time limit interrupts a thread once per message
_MAX_TRACE_LINES = 20
_MAX_TRACE_LINE_CHARS = 2_000


class StepTimeoutError(Exception):
    """An ``async def`` handler was cancelled at its step's deadline."""


@dataclass(frozen=True)
class StepOutcome:
    """What an attempt produced: its ``workflow_steps.results`` document (JSON text) and, for a
    failure, the error type, whether the retry rules may run the step again, whether it counts
    against the step's circuit breaker and the exception it came from (with its traceback, for
    error reporting; never stored)."""

    success: bool
    document: str
    error_type: str | None = None
    retryable: bool = False
    trips_breaker: bool = False
    exception: BaseException | None = field(default=None, compare=False, repr=False)


def run_handler(
    handler: Callable[[StepContext], Any],
    context: StepContext,
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> StepOutcome:
    """Run ``handler`` (sync or ``async def``) and turn what it did into an outcome; never raises.

    An awaitable is run on a fresh event loop and cancelled at ``context.deadline``. A result of
    more than ``max_bytes`` bytes of JSON is refused.
    """
    try:
        value = handler(context)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value, context.time_left()))
    except BaseException as exc:  # total: see the module docstring
        return _failure(exc, context)
    return _success(value, context, max_bytes)


async def _await(value: Any, timeout: float | None) -> Any:
    if timeout is None:
        return await value
    try:
        async with asyncio.timeout(timeout) as scope:
            return await value
    except TimeoutError as exc:
        if scope.expired():
            raise StepTimeoutError(
                "the handler was cancelled at the step's deadline (its timeout ran out)"
            ) from exc
        raise


def _success(value: Any, context: StepContext, max_bytes: int) -> StepOutcome:
    for _ in range(_MAX_INTERRUPTS):
        try:
            check_payload(value, "result")
            result = dump_json(value, "the result", limit=max_bytes)  # the limit is the value's
            return StepOutcome(True, _success_document(result, context.attempt))
        except Exception as exc:  # PayloadError, or an object whose inspection itself fails
            return refused_outcome(context.attempt, exc, where="result")
        except BaseException:  # an interrupt meant for the handler landed here: check again
            continue
    return refused_outcome(context.attempt, RuntimeError("interrupted"), where="result")


def _success_document(result: str, attempt: int) -> str:
    """The stored document of a success, around the result's JSON text (encoded once)."""
    return (
        f'{{"success":true,"result":{result},"error":null,'
        f'"metadata":{{"attempt":{int(attempt)},"retryable":false}}}}'
    )


def _failure(exc: BaseException, context: StepContext) -> StepOutcome:
    error_type, retryable, retry_after = _classify(exc)
    if not isinstance(exc, Exception):
        logger.warning(
            "Step %s (%s) raised %s; recorded as a retryable failure (a handler cannot stop a "
            "worker)",
            context.step_uuid,
            context.step_name,
            error_type,
        )
    error = _error(exc, error_type, retryable=retryable, where="handler")
    error["retry_after"] = retry_after
    trips = error_type == HANDLER_TIMEOUT or (
        isinstance(exc, Exception) and not isinstance(exc, PermanentError)
    )
    return _failure_outcome(context.attempt, error, exc, trips_breaker=trips)


def _classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """``(error_type, retryable, retry_after)`` of a handler's exception."""
    name = type(exc).__name__
    if isinstance(exc, RetryableError):
        return name, True, _seconds(exc.retry_after)
    if isinstance(exc, PermanentError):
        return name, False, None
    if isinstance(exc, StepTimeoutError) or name == "TimeLimitExceeded":
        return HANDLER_TIMEOUT, True, None
    if name == "Shutdown":  # Dramatiq's shutdown notification
        return WORKER_SHUTDOWN, True, None
    return name, True, None


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def refused_outcome(attempt: int, exc: BaseException, *, where: str) -> StepOutcome:
    """A permanent failure for an outcome that cannot be stored as it is.

    ``where`` says what was refused: ``"result"`` (the handler's return value: error type
    ``payload_error``) or ``"record"`` (the database refused to record the outcome).
    """
    error_type = PAYLOAD_ERROR if where == "result" else OUTCOME_NOT_RECORDABLE
    error = _error(exc, error_type, retryable=False, where=where)
    return _failure_outcome(attempt, error, exc)


def worker_died_outcome(attempt: int) -> StepOutcome:
    """The permanent failure of a step whose worker died on its last allowed attempt."""
    error = {
        "message": "the worker running this step died on its last allowed attempt",
        "error_type": WORKER_DIED,
        "retryable": False,
        "where": "worker",
    }
    return _failure_outcome(attempt, error)


def minimal_failure_document(attempt: int, exc: BaseException) -> str:
    """The last-resort document: fixed text plus the (sanitised) name of what went wrong."""
    error = {
        "message": "the outcome of this attempt could not be recorded; see the worker's log",
        "error_type": OUTCOME_NOT_RECORDABLE,
        "retryable": False,
        "where": "record",
        "cause": safe_text(type(exc).__name__, 200),
    }
    return _failure_outcome(attempt, error).document


def _failure_outcome(
    attempt: int,
    error: dict[str, Any],
    exc: BaseException | None = None,
    *,
    trips_breaker: bool = False,
) -> StepOutcome:
    document = {
        "success": False,
        "result": None,
        "error": error,
        "metadata": {"attempt": attempt, "retryable": bool(error["retryable"])},
    }
    return StepOutcome(
        False,
        json.dumps(document),
        str(error["error_type"]),
        bool(error["retryable"]),
        trips_breaker,
        exc,
    )


def _error(exc: BaseException, error_type: str, *, retryable: bool, where: str) -> dict[str, Any]:
    return {
        "message": _message(exc),
        "error_type": safe_text(error_type, 200),
        "retryable": retryable,
        "retry_after": None,
        "where": where,
        "backtrace": _backtrace(exc),
    }


def _message(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:  # a __str__ that raises must not hide the failure
        text = f"<{name} whose str() raised>"
    return safe_text(text or name, _MAX_MESSAGE_CHARS)


def _backtrace(exc: BaseException) -> list[str]:
    try:
        lines = traceback.format_exception(exc)
    except BaseException:
        return []
    return [safe_text(line, _MAX_TRACE_LINE_CHARS) for line in lines[-_MAX_TRACE_LINES:]]


def safe_text(value: object, limit: int) -> str:
    """``value`` as a string jsonb accepts: NUL and lone surrogates escaped, at most ``limit``
    characters (longer text is cut and marked)."""
    # str's own methods, not those of a subclass a handler may have made
    plain = str.replace(value, "\x00", "\\x00") if isinstance(value, str) else type(value).__name__
    text = plain.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = text[:limit] + "...[cut]"
    return text

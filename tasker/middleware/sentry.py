"""Step failures to Sentry, as Dramatiq middleware (docs/operations.md, "Sentry").

A step handler's exception never reaches Dramatiq: :func:`tasker.engine.outcomes.run_handler`
turns it into the step's recorded outcome, so sentry-sdk's Dramatiq integration (which reports
what actors raise) never sees it. :class:`SentryStepFailures` is the step executor's failure
reporter instead (:class:`tasker.engine.steps.FailureReporter`). For each failed attempt:

* **final** (the error is permanent, the step is not retryable, or it was the last attempt;
  ``payload_error`` is permanent): one ``error`` event with the exception and its traceback,
  tagged ``namespace``, ``workflow``, ``step``, ``task_uuid``, ``attempt``, ``error_type`` and
  ``correlation_id``, with the context ``tasker_step``;
* **to be retried**: no event, a breadcrumb (level ``warning``) on the scope of the message
  being processed, so that an error captured later in that delivery shows it.

Whether a failure is final is decided by the engine's retry rule
(:func:`tasker.workflow.backoff.final_failure_reason`), as the engine decides it when it
processes the outcome. Only imported when ``sentry.dsn`` is set: it imports sentry-sdk.
"""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from dramatiq.broker import Broker
from dramatiq.middleware import Middleware
from sentry_sdk.utils import event_from_exception

from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.steps import StepFailure
from tasker.runtime.steps import existing_step_executor, step_executor

__all__ = ["DEFAULT_FLUSH_TIMEOUT_S", "SentryStepFailures", "step_tags"]

logger = logging.getLogger(__name__)

#: Seconds a stopping worker waits for the events still queued to be sent.
DEFAULT_FLUSH_TIMEOUT_S = 2.0


def step_tags(failure: StepFailure) -> dict[str, str]:
    """The tags of a failed attempt's event (and the data of its breadcrumb)."""
    context = failure.context
    return {
        "namespace": context.namespace,
        "workflow": context.workflow,
        "step": context.step_name,
        "task_uuid": context.task_uuid,
        "attempt": str(context.attempt),
        "error_type": str(failure.outcome.error_type),
        "correlation_id": context.correlation_id,
    }


class SentryStepFailures(Middleware):
    """Reports the failed attempts of the steps this worker runs (see the module docstring):
    it becomes the step executor's failure reporter at worker boot, and flushes the events
    still queued when the worker stops."""

    def __init__(
        self, broker: PGMQBroker, *, flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S
    ) -> None:
        self.pgmq = broker
        self.flush_timeout_s = flush_timeout_s

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        step_executor(self.pgmq).failure_reporter = self

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        executor = existing_step_executor(self.pgmq)
        if executor is not None and executor.failure_reporter is self:
            executor.failure_reporter = None
        sentry_sdk.flush(timeout=self.flush_timeout_s)

    def step_failed(self, failure: StepFailure) -> None:
        """Send a final failure as an error event; leave a breadcrumb for one to be retried."""
        tags = step_tags(failure)
        context = failure.context
        if not failure.final:
            sentry_sdk.add_breadcrumb(
                category="tasker.step",
                level="warning",
                message=(
                    f"Step {context.step_name} attempt {context.attempt}/{context.max_attempts} "
                    f"failed with {failure.outcome.error_type}; it will be retried"
                ),
                data=tags,
            )
            return
        with sentry_sdk.new_scope() as scope:
            scope.set_tags(tags)
            scope.set_context(
                "tasker_step",
                {
                    "step_uuid": context.step_uuid,
                    "attempt": context.attempt,
                    "max_attempts": context.max_attempts,
                    "retryable_error": failure.outcome.retryable,
                    "final_because": failure.reason,
                    "correlation_id": context.correlation_id,
                },
            )
            self._capture(failure)

    def _capture(self, failure: StepFailure) -> None:
        exception = failure.outcome.exception
        if exception is None:  # every handler failure has one; kept total all the same
            sentry_sdk.capture_message(
                f"Step {failure.context.step_name} failed: {failure.outcome.error_type}",
                level="error",
            )
            return
        event, hint = event_from_exception(
            exception,
            client_options=sentry_sdk.get_client().options,
            mechanism={"type": "tasker", "handled": False},
        )
        event["level"] = "error"
        sentry_sdk.capture_event(event, hint=hint)

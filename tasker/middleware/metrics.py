"""The worker's Prometheus metrics as Dramatiq middleware (the families: :mod:`tasker.metrics`).

:class:`Metrics` counts, in memory, what the worker already knows, never asking the database:

* **messages**: every message its actors processed, by queue and outcome (Dramatiq's
  ``after_process_message`` and ``after_skip_message``);
* **steps**: it observes the step executor (:class:`tasker.engine.steps.StepObserver`), which
  reports every delivery once it is settled: the claim's outcome (or ``breaker_open`` for a
  delivery its step's circuit breaker deferred before any claim), the state the recorded outcome
  left the step in, the handler's run time and the attempt;
* **tasks**: the orchestration stages tell it (:meth:`Metrics.task_created`,
  :meth:`Metrics.task_moved`) what they did once it committed: a task created from a task
  request, a task moved to a final state or to ``blocked_by_failures`` by finalization, result
  processing or re-evaluation. A step whose inline record moves its task there counts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware
from prometheus_client import Counter, Gauge, Histogram

from tasker.engine.sql_outcomes import ClaimOutcome
from tasker.engine.steps import StepReport, StepRunner, Unclaimed
from tasker.engine.tasks import TaskHandle
from tasker.metrics import WorkerMetrics, worker_metrics
from tasker.workflow.states import StepState, TaskState

__all__ = ["Metrics", "counts_as_finished"]

#: Claims after which the executor runs the handler (and calls ``step_started``).
_RUNS = frozenset({ClaimOutcome.CLAIMED, ClaimOutcome.RECLAIMED, ClaimOutcome.REPEATED})
#: Step states after which a step never runs again (its attempts are observed).
_STEP_DONE = frozenset({StepState.COMPLETE, StepState.ERROR})


def counts_as_finished(state: object) -> bool:
    """Whether a task moved to ``state`` counts in ``tasker_tasks_finished_total``: a final
    state, or ``blocked_by_failures`` (where it waits for a person)."""
    if not isinstance(state, str) or state not in TaskState._value2member_map_:
        return False
    task_state = TaskState(state)
    return task_state.terminal or task_state is TaskState.BLOCKED_BY_FAILURES


@dataclass(frozen=True)
class _StepSeries:
    """The labelled children of one step actor, looked up once (``labels()`` takes a lock)."""

    running: Gauge
    duration: Histogram
    attempts: Histogram


class Metrics(Middleware):
    """Counts messages, steps and tasks in ``metrics`` (this process's :func:`worker_metrics`
    by default). :func:`tasker.runtime.workflows.install` adds it to the broker and to the step
    executor's ``observers``, and hands it to the orchestration stages."""

    def __init__(self, metrics: WorkerMetrics | None = None) -> None:
        self.metrics = metrics or worker_metrics()
        self._steps: dict[tuple[str, str, str], _StepSeries] = {}
        self._claims: dict[tuple[str, str, ClaimOutcome | Unclaimed], Counter] = {}
        self._finished: dict[tuple[str, str, str, StepState], Counter] = {}
        self._messages: dict[tuple[str, str], Counter] = {}

    # -- Dramatiq hooks ------------------------------------------------------------------------

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._message_counter(message.queue_name, "done" if exception is None else "failed").inc()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._message_counter(message.queue_name, "skipped").inc()

    def _message_counter(self, queue: str, outcome: str) -> Counter:
        counter = self._messages.get((queue, outcome))
        if counter is None:
            counter = self._messages[(queue, outcome)] = self.metrics.messages.labels(
                queue, outcome
            )
        return counter

    # -- the orchestration stages --------------------------------------------------------------

    def task_created(self, handle: TaskHandle) -> None:
        """A task request was handled: ``handle`` (counted if it created the task)."""
        if handle.created:
            self.metrics.tasks_created.labels(handle.namespace, handle.name).inc()

    def task_moved(self, state: str | None) -> None:
        """A stage moved a task to ``state`` (None: it did nothing)."""
        if counts_as_finished(state):
            self.metrics.tasks_finished.labels(state).inc()

    # -- the step executor's observer ----------------------------------------------------------

    def step_started(self, runner: StepRunner, attempt: int) -> None:
        self._series(runner).running.inc()

    def step_finished(self, report: StepReport) -> None:
        runner = report.runner
        self._claim_counter(runner, report.claim).inc()
        if report.claim not in _RUNS:
            self._record(report)
            return
        series = self._series(runner)
        series.running.dec()
        if report.handler_s is not None:
            series.duration.observe(report.handler_s)
        self._record(report, series)

    def _record(self, report: StepReport, series: _StepSeries | None = None) -> None:
        applied = report.applied
        if applied is None:
            return
        runner = report.runner
        state = applied.step_state
        key = (runner.namespace, runner.workflow, runner.step, state)
        counter = self._finished.get(key)
        if counter is None:
            counter = self._finished[key] = self.metrics.steps_finished.labels(*key)
        counter.inc()
        if state in _STEP_DONE and report.attempt:
            (series or self._series(runner)).attempts.observe(report.attempt)
        self.task_moved(applied.task_state)

    def _series(self, runner: StepRunner) -> _StepSeries:
        key = (runner.namespace, runner.workflow, runner.step)
        series = self._steps.get(key)
        if series is None:
            m = self.metrics
            series = _StepSeries(
                running=m.steps_in_progress.labels(runner.namespace, runner.workflow),
                duration=m.step_duration.labels(*key),
                attempts=m.step_attempts.labels(*key),
            )
            self._steps[key] = series  # a race makes the same children twice: harmless
        return series

    def _claim_counter(self, runner: StepRunner, outcome: ClaimOutcome | Unclaimed) -> Counter:
        key = (runner.namespace, runner.workflow, outcome)
        counter = self._claims.get(key)
        if counter is None:
            counter = self._claims[key] = self.metrics.step_claims.labels(
                runner.namespace, runner.workflow, outcome.value
            )
        return counter

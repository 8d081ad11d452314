"""The worker's Prometheus metrics as Dramatiq middleware (the families: :mod:`tasker.metrics`).

:class:`Metrics` counts, in memory, what the engine already knows, never asking the database:

* **steps**: it observes the step executor (:class:`tasker.engine.steps.StepObserver`), which
  reports every delivery once it is settled: the claim's outcome, the state the recorded outcome
  left the step in, the handler's run time and the attempt;
* **tasks**: the orchestration stages' results, after their commit (Dramatiq's
  ``after_process_message``): a task created from a task request, and a task moved to a final
  state or to ``blocked_by_failures`` by finalization, result processing or re-evaluation. A step
  whose inline record moves its task there counts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware
from prometheus_client import Counter, Gauge, Histogram

from tasker.engine.messages import FINALIZE, PROCESS_RESULT, STEP_ENQUEUE, TASK_REQUEST
from tasker.engine.sql_outcomes import ClaimOutcome
from tasker.engine.steps import StepReport, StepRunner
from tasker.metrics import WorkerMetrics, worker_metrics
from tasker.workflow.states import StepState, TaskState

__all__ = ["Metrics", "counts_as_finished"]

#: Claims after which the executor runs the handler (and calls ``step_started``).
_RUNS = frozenset({ClaimOutcome.CLAIMED, ClaimOutcome.RECLAIMED, ClaimOutcome.REPEATED})
#: Step states after which a step never runs again (its attempts are observed).
_STEP_DONE = frozenset({StepState.COMPLETE, StepState.ERROR})
#: Stage actors whose result is the task's new state.
_MOVES_TASKS = frozenset({FINALIZE.actor, PROCESS_RESULT.actor, STEP_ENQUEUE.actor})


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
    """Counts steps and tasks in ``metrics`` (this process's :func:`worker_metrics` by
    default). It is the step executor's observer too: :func:`tasker.runtime.workflows.install`
    adds it to the broker and to the executor's ``observers``."""

    def __init__(self, metrics: WorkerMetrics | None = None) -> None:
        self.metrics = metrics or worker_metrics()
        self._steps: dict[tuple[str, str, str], _StepSeries] = {}
        self._claims: dict[tuple[str, str, ClaimOutcome], Counter] = {}
        self._finished: dict[tuple[str, str, str, StepState], Counter] = {}

    # -- the step executor's observer ------------------------------------------------------------

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
        if counts_as_finished(applied.task_state):
            self.metrics.tasks_finished.labels(applied.task_state).inc()

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

    def _claim_counter(self, runner: StepRunner, outcome: ClaimOutcome) -> Counter:
        key = (runner.namespace, runner.workflow, outcome)
        counter = self._claims.get(key)
        if counter is None:
            counter = self._claims[key] = self.metrics.step_claims.labels(
                runner.namespace, runner.workflow, outcome.value
            )
        return counter

    # -- Dramatiq hooks: the orchestration stages ------------------------------------------------

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None:
            return
        actor = message.actor_name
        if actor in _MOVES_TASKS:
            if counts_as_finished(result):
                self.metrics.tasks_finished.labels(result).inc()
        elif actor == TASK_REQUEST.actor and isinstance(result, dict) and result.get("created"):
            self.metrics.tasks_created.labels(result["namespace"], result["name"]).inc()

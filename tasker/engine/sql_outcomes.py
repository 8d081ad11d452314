"""The words Tasker's stored functions answer with, typed once (their source: sql/migrations/).

The engine compares these members, never string literals; ``tests/test_vocabulary.py`` checks that
the functions' source and these enums name the same words, so neither side can gain or lose one
alone. The state names are :class:`~tasker.workflow.states.TaskState` and
:class:`~tasker.workflow.states.StepState`, checked against the tables' CHECK constraints.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CancelOutcome",
    "ClaimOutcome",
    "CompletionOutcome",
    "ExecutionStatus",
    "ManualAction",
    "ManualOutcome",
]


class ClaimOutcome(StrEnum):
    """What ``tasker.claim_step_v2`` answered to a delivery asking for its step."""

    CLAIMED = "claimed"  # from enqueued
    RECLAIMED = "reclaimed"  # the previous claim's lease ran out
    REPEATED = "repeated"  # the same delivery asked again
    BUSY = "busy"  # a live claim holds the step until claimed_until
    EXHAUSTED = "exhausted"  # the previous claim ran out on the last allowed attempt
    TASK_FINISHED = "task_finished"  # the task is final (given up, cancelled): do not run it
    SKIPPED = "skipped"  # nothing to run: the step is pending, done or waiting
    MISSING = "missing"  # no such step


class CompletionOutcome(StrEnum):
    """What ``tasker.complete_step_v3`` (the inline success of a step) answered (v2 too)."""

    LOST = "lost"  # the attempt lost its claim: nothing was recorded
    LATE = "late"  # recorded, but the task had finished already
    PROCESSING = "processing"  # recorded; other steps of the task still run
    ENQUEUED = "enqueued"  # recorded, and steps that became ready were enqueued: send them
    FINALIZE = "finalize"  # recorded, and every step is complete: finalize the task
    EVALUATE = "evaluate"  # recorded; the general path decides (the task row is locked)


class ExecutionStatus(StrEnum):
    """A task's ``execution_status`` from ``tasker.task_execution_context_v2``, in the order the
    function tries them (the first that matches wins)."""

    HAS_READY_STEPS = "has_ready_steps"
    PROCESSING = "processing"  # steps enqueued, running or waiting for orchestration
    WAITING_FOR_RETRY = "waiting_for_retry"
    BLOCKED_BY_FAILURES = "blocked_by_failures"  # a step failed and nothing else runs or waits
    ALL_COMPLETE = "all_complete"
    WAITING_FOR_DEPENDENCIES = "waiting_for_dependencies"


class CancelOutcome(StrEnum):
    """What ``tasker.cancel_task_v1`` answered."""

    CANCELLED = "cancelled"  # the task is cancelled now
    FINAL = "final"  # the task was final already (its state says which): nothing changed
    MISSING = "missing"  # no such task


class ManualOutcome(StrEnum):
    """What ``tasker.manual_step_action_v1`` answered."""

    DONE = "done"  # the step moved; a reopened task is moved forward by the caller
    MISSING = "missing"  # no such task, or the step is not one of its steps
    TASK_FINAL = "task_final"  # the task is complete, cancelled or resolved
    STEP_RUNNING = "step_running"  # a worker runs the step now
    NOT_ALLOWED = "not_allowed"  # the step's state does not allow the action


class ManualAction(StrEnum):
    """The manual step actions (seed-spec 9.1: reset_for_retry, resolve_manually,
    complete_manually)."""

    RETRY = "retry"  # error -> pending, attempts back to 0
    RESOLVE = "resolve"  # -> resolved_manually: dependents proceed without a result
    COMPLETE = "complete"  # -> complete with a result supplied by the operator

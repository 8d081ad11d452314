"""Task and step state machines (the seed's 12 task and 10 step states, with its names).

The current state is stored on the task or step row; every change is checked here first, so an
invalid transition raises :class:`InvalidTransitionError` before anything is written.
"""

from __future__ import annotations

from enum import StrEnum

from tasker.exceptions import InvalidTransitionError

__all__ = [
    "InvalidTransitionError",
    "StepState",
    "TaskState",
    "check_give_up",
    "check_step_path",
    "check_task_path",
]


class TaskState(StrEnum):
    PENDING = "pending"
    INITIALIZING = "initializing"
    ENQUEUING_STEPS = "enqueuing_steps"
    STEPS_IN_PROCESS = "steps_in_process"
    EVALUATING_RESULTS = "evaluating_results"
    WAITING_FOR_DEPENDENCIES = "waiting_for_dependencies"
    WAITING_FOR_RETRY = "waiting_for_retry"
    BLOCKED_BY_FAILURES = "blocked_by_failures"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"
    RESOLVED_MANUALLY = "resolved_manually"

    @property
    def terminal(self) -> bool:
        return self in _TASK_TERMINAL


class StepState(StrEnum):
    PENDING = "pending"
    ENQUEUED = "enqueued"
    IN_PROGRESS = "in_progress"
    ENQUEUED_FOR_ORCHESTRATION = "enqueued_for_orchestration"
    ENQUEUED_AS_ERROR_FOR_ORCHESTRATION = "enqueued_as_error_for_orchestration"
    WAITING_FOR_RETRY = "waiting_for_retry"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"
    RESOLVED_MANUALLY = "resolved_manually"

    @property
    def satisfies_dependencies(self) -> bool:
        return self in (StepState.COMPLETE, StepState.RESOLVED_MANUALLY)


_TASK_TERMINAL = frozenset(
    {TaskState.COMPLETE, TaskState.ERROR, TaskState.CANCELLED, TaskState.RESOLVED_MANUALLY}
)

T = TaskState
_TASK_EDGES: dict[TaskState, frozenset[TaskState]] = {
    T.PENDING: frozenset({T.INITIALIZING}),
    T.INITIALIZING: frozenset({T.ENQUEUING_STEPS, T.COMPLETE, T.WAITING_FOR_DEPENDENCIES}),
    T.ENQUEUING_STEPS: frozenset({T.STEPS_IN_PROCESS, T.ERROR}),
    T.STEPS_IN_PROCESS: frozenset({T.EVALUATING_RESULTS, T.WAITING_FOR_RETRY, T.COMPLETE, T.ERROR}),
    T.EVALUATING_RESULTS: frozenset(
        {
            T.COMPLETE,
            T.ENQUEUING_STEPS,
            T.WAITING_FOR_DEPENDENCIES,
            T.BLOCKED_BY_FAILURES,
            T.WAITING_FOR_RETRY,
            T.STEPS_IN_PROCESS,
        }
    ),
    T.WAITING_FOR_DEPENDENCIES: frozenset({T.EVALUATING_RESULTS}),
    T.WAITING_FOR_RETRY: frozenset({T.ENQUEUING_STEPS, T.EVALUATING_RESULTS}),
    # a manual step action reopens a blocked or given-up task (tasker.engine.actions)
    T.BLOCKED_BY_FAILURES: frozenset({T.ERROR, T.EVALUATING_RESULTS}),
    T.ERROR: frozenset({T.PENDING, T.EVALUATING_RESULTS}),
    T.COMPLETE: frozenset(),
    T.CANCELLED: frozenset(),
    T.RESOLVED_MANUALLY: frozenset(),
}

S = StepState
_STEP_EDGES: dict[StepState, frozenset[StepState]] = {
    S.PENDING: frozenset({S.ENQUEUED, S.WAITING_FOR_RETRY, S.ERROR}),
    S.ENQUEUED: frozenset({S.IN_PROGRESS, S.WAITING_FOR_RETRY, S.ERROR}),
    # in_progress -> in_progress: a redelivered message re-claims a step whose worker died.
    S.IN_PROGRESS: frozenset(
        {
            S.IN_PROGRESS,
            S.ENQUEUED_FOR_ORCHESTRATION,
            S.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION,
            S.WAITING_FOR_RETRY,
            S.ERROR,
            S.COMPLETE,
        }
    ),
    S.ENQUEUED_FOR_ORCHESTRATION: frozenset({S.COMPLETE, S.ERROR}),
    S.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION: frozenset({S.WAITING_FOR_RETRY, S.ERROR, S.COMPLETE}),
    S.WAITING_FOR_RETRY: frozenset({S.PENDING}),
    S.ERROR: frozenset({S.PENDING}),
    S.COMPLETE: frozenset(),
    S.CANCELLED: frozenset(),
    S.RESOLVED_MANUALLY: frozenset(),
}
_STEP_CANCELLABLE = frozenset(set(StepState) - {S.COMPLETE, S.CANCELLED, S.RESOLVED_MANUALLY})


def _allowed_task(current: TaskState, target: TaskState) -> bool:
    if target is T.RESOLVED_MANUALLY:
        return True
    if target is T.CANCELLED:
        return not current.terminal
    return target in _TASK_EDGES[current]


def _allowed_step(current: StepState, target: StepState) -> bool:
    if target in (S.RESOLVED_MANUALLY,):
        return True
    if target is S.CANCELLED:
        return current in _STEP_CANCELLABLE
    return target in _STEP_EDGES[current]


def check_task_path(current: str, *path: str) -> TaskState:
    """Validate ``current -> path[0] -> ...``; return the final state."""
    state = TaskState(current)
    for name in path:
        target = TaskState(name)
        if not _allowed_task(state, target):
            raise InvalidTransitionError(f"task cannot move from {state} to {target}")
        state = target
    return state


def check_give_up(current: str) -> TaskState:
    """A task that is not final may always be given up (``-> error``): the coordinator does it to
    a task past its staleness limit (seed-spec 10.4), which is the one move the ordinary edges do
    not have from every state."""
    state = TaskState(current)
    if state.terminal:
        raise InvalidTransitionError(f"task cannot be given up from the final state {state}")
    return T.ERROR


def check_step_path(current: str, *path: str) -> StepState:
    """Validate ``current -> path[0] -> ...`` for a step; return the final state."""
    state = StepState(current)
    for name in path:
        target = StepState(name)
        if not _allowed_step(state, target):
            raise InvalidTransitionError(f"step cannot move from {state} to {target}")
        state = target
    return state

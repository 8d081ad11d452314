"""Every outcome path of a step ends in a recorded state, with its message settled in that commit.

The kinds tried here: results the database cannot store (NUL or a lone surrogate in a key or a
value, at any depth; objects JSON cannot hold; too large; nested too deep), exceptions that cannot
be printed (``__str__`` raising or returning garbage, NUL or lone surrogates in the message), and
handlers raising ``BaseException`` subclasses, sync and async.
"""

from __future__ import annotations

import asyncio
import pkgutil
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import tasker
from tests.support import InProcessFlows, scalar


def one_step_flow(name: str, handler: Callable[..., Any], *, max_attempts: int = 1) -> Any:
    """``only`` runs ``handler``; ``after`` depends on it and must never run if ``only`` fails."""
    flow = tasker.Workflow("settle", name, version="1.0.0", register=False)
    flow.step("only", max_attempts=max_attempts)(handler)

    @flow.step(depends_on=["only"])
    def after(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"seen": ctx.parent_results["only"]}

    return flow


def assert_settled(flows: InProcessFlows, status: tasker.TaskStatus) -> None:
    """No step is left mid-flight and no message of the task is left in any queue."""
    assert all(s.state not in ("in_progress", "enqueued") for s in status.steps), status
    left = scalar(flows.url, "SELECT count(*) FROM pgmq.q_tasker_worker_settle_queue")
    assert left == 0


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


class NotAStringError(Exception):
    def __str__(self) -> Any:
        return 42  # noqa: PLE0307 - a __str__ that breaks its contract is the point


class NestedWeirdError(Exception):
    def __str__(self) -> str:
        raise UnprintableError()


class Custom(BaseException):
    pass


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


UNSTORABLE_RESULTS = {
    "nul_in_key": {"a\x00b": 1},
    "nul_in_nested_key": {"x": [{"k\x00": 1}]},
    "nul_in_value": {"x": "a\x00"},
    "surrogate_in_key": {"\ud800": 1},
    "surrogate_in_nested_value": {"x": {"y": ["ok", "\udfff"]}},
    "object": {"x": object()},
    "nan": {"x": float("nan")},
    "two_mib": {"x": "y" * (2 * 1024 * 1024)},
    "nested_5000_deep": {"x": _deep(5000)},
}


@pytest.mark.parametrize("result", UNSTORABLE_RESULTS.values(), ids=UNSTORABLE_RESULTS.keys())
def test_an_unstorable_result_fails_the_step_permanently(
    flows: InProcessFlows, result: Any
) -> None:
    flow = one_step_flow("unstorable", lambda ctx: result, max_attempts=3)
    status = flows.run(flow)
    only = status.step("only")
    assert status.state == "blocked_by_failures"
    assert only.state == "error" and only.attempts == 1  # permanent: no retry
    assert only.error is not None
    assert only.error["error_type"] == "payload_error"
    assert only.error["where"] == "result"
    assert only.error["retryable"] is False
    assert status.step("after").state == "pending"  # dependents never run
    assert_settled(flows, status)


RAISERS: dict[str, BaseException] = {
    "str_raises": UnprintableError("x"),
    "str_raises_a_raising_exception": NestedWeirdError(),
    "str_returns_int": NotAStringError(),
    "lone_surrogate_message": ValueError("bad \ud800 text"),
    "nul_message": ValueError("nul \x00 here"),
    "huge_message": ValueError("m" * 1_000_000),
    "system_exit": SystemExit(3),
    "keyboard_interrupt": KeyboardInterrupt(),
    "generator_exit": GeneratorExit(),
    "base_exception_subclass": Custom("custom"),
    "retryable_error_with_nan_retry_after": tasker.RetryableError("x", retry_after=float("nan")),
}


@pytest.mark.parametrize("exc", RAISERS.values(), ids=RAISERS.keys())
def test_every_handler_exception_is_recorded_as_a_failure(
    flows: InProcessFlows, exc: BaseException
) -> None:
    def handler(ctx: tasker.StepContext) -> None:
        raise exc

    status = flows.run(one_step_flow("raiser", handler))
    only = status.step("only")
    assert status.state == "blocked_by_failures"
    assert only.state == "error" and only.attempts == 1
    assert only.error is not None
    assert only.error["where"] == "handler"
    assert only.error["retryable"] is True  # retryable, but max_attempts=1
    assert only.error["error_type"] == type(exc).__name__
    assert isinstance(only.error["message"], str) and only.error["message"]
    assert len(only.error["message"]) < 5_000
    assert_settled(flows, status)


@pytest.mark.parametrize("exc", [SystemExit(1), KeyboardInterrupt(), Custom()], ids=repr)
def test_a_base_exception_is_retried_and_the_worker_keeps_running(
    flows: InProcessFlows, exc: BaseException
) -> None:
    def handler(ctx: tasker.StepContext) -> dict[str, int]:
        if ctx.attempt == 1:
            raise exc
        return {"attempt": ctx.attempt}

    flow = one_step_flow("base", handler, max_attempts=2)
    flow.backoff = tasker.BackoffPolicy(base_seconds=0.05, jitter=0)
    status = flows.run(flow)
    assert status.state == "complete"
    assert status.step("only").attempts == 2
    assert status.step("after").result == {"seen": {"attempt": 2}}
    handle = flows.client.submit("settle", "base", {"again": True})  # the same threads serve
    assert flows.client.wait(handle.task_uuid, timeout=30).state == "complete"


@pytest.mark.parametrize(
    "exc", [SystemExit(2), asyncio.CancelledError(), Custom(), ValueError("\udc80")], ids=repr
)
def test_async_handlers_settle_the_same_way(flows: InProcessFlows, exc: BaseException) -> None:
    async def handler(ctx: tasker.StepContext) -> None:
        await asyncio.sleep(0)
        raise exc

    status = flows.run(one_step_flow("async_raiser", handler))
    only = status.step("only")
    assert only.state == "error" and only.error is not None
    assert only.error["error_type"] == type(exc).__name__
    assert_settled(flows, status)


def test_an_async_handler_is_cancelled_at_its_timeout(flows: InProcessFlows) -> None:
    seen: list[float | None] = []

    flow = tasker.Workflow("settle", "slow_async", version="1.0.0", register=False)

    @flow.step(timeout=0.5, max_attempts=1)
    async def only(ctx: tasker.StepContext) -> None:
        seen.append(ctx.time_left())
        await asyncio.sleep(60)

    status = flows.run(flow)
    step = status.step("only")
    assert step.state == "error" and step.error is not None
    assert step.error["error_type"] == "handler_timeout"
    assert seen and seen[0] is not None and 0 < seen[0] <= 0.5
    assert step.finished_at is not None and step.started_at is not None
    assert (step.finished_at - step.started_at).total_seconds() < 30  # cancelled, not waited out
    assert_settled(flows, status)


def test_the_context_tells_handlers_their_deadline(flows: InProcessFlows) -> None:
    flow = tasker.Workflow("settle", "deadline", version="1.0.0", register=False)

    @flow.step(timeout=30)
    def timed(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"deadline": ctx.deadline is not None, "left": ctx.time_left()}

    @flow.step(depends_on=["timed"])
    def untimed(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"deadline": ctx.deadline, "left": ctx.time_left()}

    status = flows.run(flow)
    timed_result = status.step("timed").result
    assert timed_result["deadline"] is True and 0 < timed_result["left"] <= 30
    assert status.step("untimed").result == {"deadline": None, "left": None}


def test_a_database_refusal_while_recording_fails_the_step_permanently(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value that passes Tasker's checks but that PostgreSQL refuses (here: a failpoint raising
    what PostgreSQL raises for a NUL) ends as a recorded permanent failure, not a stuck step."""
    from tasker.engine import steps

    real = steps.record_outcome
    refusals = []

    def refuse_successes(conn: Any, sender: Any, step: Any, attempt: int, outcome: Any, **kw: Any):
        if outcome.success:
            refusals.append(step)
            raise psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence")
        return real(conn, sender, step, attempt, outcome, **kw)

    monkeypatch.setattr(steps, "record_outcome", refuse_successes)
    status = flows.run(one_step_flow("refused", lambda ctx: {"ok": 1}))
    only = status.step("only")
    assert refusals
    assert status.state == "blocked_by_failures" and only.state == "error" and only.attempts == 1
    assert only.error is not None and only.error["error_type"] == "payload_error"
    assert "Unicode escape" in only.error["message"]
    assert_settled(flows, status)


def test_when_even_the_failure_cannot_be_recorded_a_minimal_one_is(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasker.engine import steps

    def always_refuse(*args: Any, **kwargs: Any) -> bool:
        raise psycopg.errors.DataError("refused")

    monkeypatch.setattr(steps, "record_outcome", always_refuse)
    status = flows.run(one_step_flow("minimal", lambda ctx: {"ok": 1}))
    only = status.step("only")
    assert only.state == "error"
    assert only.error is not None and only.error["error_type"] == "outcome_not_recordable"
    assert status.state == "blocked_by_failures"  # the task was re-evaluated
    assert status.step("after").state == "pending"
    assert_settled(flows, status)


def _time_limit_exceeded() -> BaseException:
    from dramatiq.middleware.time_limit import TimeLimitExceeded

    return TimeLimitExceeded()


RECORDING_HICCUPS = {
    # the connection is lost twice while recording: repeated on fresh connections
    "connection_lost_twice": [psycopg.OperationalError("server closed the connection")] * 2,
    "deadlock": [psycopg.errors.DeadlockDetected("deadlock detected")],
    # Dramatiq's time limit raises asynchronously; when the handler returned just before the
    # deadline, the interrupt lands in the recording code instead
    "time_limit_interrupt": [_time_limit_exceeded()],
}


@pytest.mark.parametrize("errors", RECORDING_HICCUPS.values(), ids=RECORDING_HICCUPS.keys())
def test_a_passing_error_while_recording_is_repeated_without_running_the_step_again(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]
) -> None:
    from tasker.engine import steps

    real = steps.record_outcome
    pending = iter(errors)
    runs: list[int] = []

    def hiccup(*args: Any, **kwargs: Any) -> bool:
        error = next(pending, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "record_outcome", hiccup)

    def handler(ctx: tasker.StepContext) -> dict[str, int]:
        runs.append(ctx.attempt)
        return {"n": 1}

    status = flows.run(one_step_flow("hiccup", handler, max_attempts=3))
    assert status.state == "complete"
    assert runs == [1]  # recorded on a fresh connection, not re-run
    assert status.step("only").attempts == 1
    assert_settled(flows, status)


def test_dramatiq_interrupts_python_code_at_the_time_limit_but_not_a_blocking_call(
    flows: InProcessFlows,
) -> None:
    """What docs/workflows.md says about sync handlers: the time limit interrupts Python code
    (checked about once a second), while a blocking call (``time.sleep``, a socket read, a query)
    runs to its end and the interrupt is raised when it returns."""
    import time

    flow = tasker.Workflow("settle", "sync_timeouts", version="1.0.0", register=False)

    @flow.step(timeout=1, max_attempts=1)
    def spins(ctx: tasker.StepContext) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # pure Python: interruptible
            pass

    @flow.step(timeout=1, max_attempts=1)
    def blocks(ctx: tasker.StepContext) -> None:
        time.sleep(3)  # one blocking call: not interruptible
        time.sleep(60)  # the interrupt is raised before this one starts

    status = flows.run(flow)
    for name, at_least in (("spins", 1.0), ("blocks", 3.0)):
        step = status.step(name)
        assert step.state == "error" and step.error is not None, name
        assert step.error["error_type"] == "handler_timeout", step.error
        assert step.started_at is not None and step.finished_at is not None
        took = (step.finished_at - step.started_at).total_seconds()
        assert at_least <= took < 30, (name, took)


@pytest.mark.parametrize("retry_after", [10**400, 1e308, float("inf"), -5, "soon", [1]], ids=repr)
def test_any_retry_after_gives_a_recorded_retry(flows: InProcessFlows, retry_after: Any) -> None:
    def handler(ctx: tasker.StepContext) -> dict[str, int]:
        if ctx.attempt == 1:
            raise tasker.RetryableError("busy", retry_after=retry_after)
        return {"attempt": ctx.attempt}

    flow = one_step_flow("retry_after", handler, max_attempts=2)
    flow.backoff = tasker.BackoffPolicy(base_seconds=0.05, max_seconds=0.2, jitter=0)
    status = flows.run(flow)
    assert status.state == "complete"
    assert status.step("only").attempts == 2
    assert_settled(flows, status)


INTERRUPTED_PHASES = {
    # the handler returned just before its deadline; Dramatiq's interrupt lands while...
    "checking_the_result": "tasker.engine.outcomes.check_payload",
    "starting_to_record": "tasker.engine.steps.StepExecutor._settle",
}


@pytest.mark.parametrize("target", INTERRUPTED_PHASES.values(), ids=INTERRUPTED_PHASES.keys())
def test_an_interrupt_after_the_handler_returned_loses_nothing(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    real = pkgutil.resolve_name(target)
    interrupts = iter([_time_limit_exceeded()])
    runs: list[int] = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        error = next(interrupts, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, interrupted)

    def handler(ctx: tasker.StepContext) -> dict[str, int]:
        runs.append(ctx.attempt)
        return {"n": 1}

    status = flows.run(one_step_flow("late_interrupt", handler, max_attempts=3))
    assert status.state == "complete" and runs == [1]
    assert status.step("only").result == {"n": 1}
    assert_settled(flows, status)


def test_a_bug_escaping_the_executor_retries_the_message_instead_of_dead_lettering_it(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasker.engine.steps import StepExecutor

    real = StepExecutor.execute
    bugs = iter([ValueError("a bug before the claim")])

    def buggy(self: StepExecutor, *args: Any, **kwargs: Any) -> Any:
        bug = next(bugs, None)
        if bug is not None:
            raise bug
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StepExecutor, "execute", buggy)
    status = flows.run(one_step_flow("buggy", lambda ctx: {"ok": True}), timeout=60)
    assert status.state == "complete"
    dead = scalar(flows.url, "SELECT count(*) FROM pgmq.q_tasker_worker_settle_queue__xq")
    assert dead == 0

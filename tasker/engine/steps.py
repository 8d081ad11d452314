"""The worker side of a step: claim it, run its handler, record the outcome, settle its message.

:class:`StepExecutor` runs one delivery of a step's message through the whole sequence, and every
path ends in one of two ways: the step's new state and the removal of the message commit in one
transaction, or the message is left to come back. Never in between:

1. **Claim** (``tasker.claim_step_v2``, one statement): ``enqueued -> in_progress`` with
   ``attempts + 1`` and a lease (``claimed_until``) that the worker's heartbeat extends while the
   handler runs. A delivery that meets a *live* claim of another delivery is deferred until that
   lease ends (no attempt used); one that meets an *expired* claim re-claims the step (its worker
   died); the same delivery repeating its claim after a lost connection gets its attempt back.
2. **Run** the handler, outside any transaction (:func:`~tasker.engine.outcomes.run_handler`,
   which turns anything the handler does into an outcome).
3. **Record** the outcome fenced by the attempt, process it (inline mode) and delete the message,
   in one transaction. Database errors are sorted by :func:`tasker.db.errors.is_transient`:
   a transient one is retried on a fresh connection for up to ``record_window_s`` (an hour:
   the handler ran, so its outcome waits in memory for the database), then raised so the
   message comes back; a redelivery of a step this process still holds is deferred, not
   re-claimed; an error caused by the data fails the step permanently with a document saying
   why; if even that cannot be written, a fixed minimal document is.
4. **Report** a failed attempt to the executor's optional :class:`FailureReporter` (error
   tracking such as Sentry, which never sees the handler's exception otherwise: ``run_handler``
   keeps it), saying whether the failure is final by the rule the engine applies when it
   processes the outcome (:func:`~tasker.workflow.backoff.final_failure_reason`).
5. **Tell** the executor's observers (:class:`StepObserver`: the worker's metrics) what every
   delivery came to, in a :class:`StepReport`: the claim's outcome, the states the record left,
   the handler's run time. In memory, after the commit: no statement is added.

Two circuit breakers (:mod:`tasker.breakers`) wrap the sequence. A step declared with a
``breaker`` passes it before the claim: while it is open, the delivery is deferred without a
claim, so it uses no attempt; its outcome is reported to it afterwards. The process's database
breaker hears of every claim and record: while it is open, they wait for it (within
``retry_window_s`` and ``record_window_s``) instead of retrying on their own. A delivery its
breaker deferred is reported to the observers too, with the claim outcome ``breaker_open``
(:class:`Unclaimed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from psycopg.rows import class_row

from tasker.breakers.database import DatabaseBreaker
from tasker.breakers.shared import Passage, SharedBreakers
from tasker.db.errors import is_data_error, is_transient
from tasker.engine.enqueue import step_messages
from tasker.engine.finalize import finish_task
from tasker.engine.messages import PROCESS_RESULT, STEP_ENQUEUE, Sender
from tasker.engine.outcomes import (
    StepOutcome,
    minimal_failure_document,
    refused_outcome,
    run_handler,
    worker_died_outcome,
)
from tasker.engine.results import (
    FollowUp,
    ResultApplied,
    apply_result,
    follow_up,
    reevaluate_task,
)
from tasker.engine.sql import q
from tasker.engine.sql_outcomes import ClaimOutcome, CompletionOutcome
from tasker.engine.transitions import move_steps
from tasker.exceptions import DatabaseUnavailableError
from tasker.workflow.backoff import final_failure_reason
from tasker.workflow.definition import StepContext
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES
from tasker.workflow.states import StepState, TaskState

__all__ = [
    "DEFAULT_RETRY_WINDOW_S",
    "Claim",
    "ClaimOutcome",
    "Connect",
    "Delivery",
    "FailureReporter",
    "Settlement",
    "StepExecutor",
    "StepFailure",
    "StepObserver",
    "StepReport",
    "StepRunner",
    "Unclaimed",
    "claim_step",
    "mark_step_waiting",
    "record_outcome",
    "task_version",
]

logger = logging.getLogger(__name__)

#: Seconds a claim is retried on fresh connections when the database is in trouble.
DEFAULT_RETRY_WINDOW_S = 10.0
#: Seconds the outcome of a handler that ran waits for the database to take it (an outage, a
#: failover): the attempt happened, so it is kept in memory and recorded when PostgreSQL is back.
DEFAULT_RECORD_WINDOW_S = 3600.0
_DEFER_MARGIN_S = 0.05
_MAX_INTERRUPTS = 3

Connect = Callable[[], AbstractContextManager[Any]]
T = TypeVar("T")


class Delivery(Protocol):
    """The queue message that asked for a step run, as the engine needs to see it."""

    @property
    def token(self) -> str:
        """Identifies this delivery (queue, message id, delivery count) across retries."""
        ...

    def settle_in(self, conn: Any) -> None:
        """Remove the message inside ``conn``'s open transaction (it commits with the outcome)."""
        ...

    def mark_settled(self) -> None:
        """After that commit: the broker must not acknowledge the message again."""
        ...

    def defer(self, delay_s: float) -> None:
        """Make the message visible again after ``delay_s`` seconds, using no attempt."""
        ...


class Settlement(StrEnum):
    """How :meth:`StepExecutor.execute` left the delivery."""

    RECORDED = "recorded"  # an outcome was recorded and the message removed with it
    SKIPPED = "skipped"  # nothing to run (the step is done, waiting or gone): acknowledge
    DEFERRED = "deferred"  # a live claim or an open breaker holds the step: it comes back later


class Unclaimed(StrEnum):
    """A :class:`StepReport`'s ``claim`` when the executor asked for no claim at all: not an
    answer of ``tasker.claim_step_v2`` (those are :class:`ClaimOutcome`)."""

    BREAKER_OPEN = "breaker_open"  # the step's breaker held it: deferred, no attempt used


@dataclass(frozen=True)
class StepRunner:
    """What is fixed per step actor: whose step it is, its handler, how results are processed,
    and whether its definition lets a failure be retried (``retryable``)."""

    namespace: str
    workflow: str
    handler: Callable[[StepContext], Any]
    timeout: float | None = None
    inline: bool = True
    breaker: str | None = None
    retryable: bool = True
    step: str = ""  # the step's name, for metrics (the claim reads it from the database too)


@dataclass(frozen=True)
class StepReport:
    """What one delivery of a step's message came to, for each :class:`StepObserver` (the
    worker's metrics): names, outcomes and states, never ids."""

    runner: StepRunner
    #: What the claim answered, or why no claim was asked for (:class:`Unclaimed`).
    claim: ClaimOutcome | Unclaimed
    attempt: int | None = None
    #: Where the recorded outcome left the step and its task; None when nothing was recorded
    #: (deferred, skipped, the attempt had lost its claim, or a transient error escaped).
    applied: ResultApplied | None = None
    #: Seconds the handler ran; None when no handler ran.
    handler_s: float | None = None


class StepObserver(Protocol):
    """Told about each delivery by :class:`StepExecutor` (its ``observers``), in the worker
    thread, after the delivery's commit: keep it to in-memory work, it runs once per step."""

    def step_started(self, runner: StepRunner, attempt: int) -> None:
        """A claimed attempt's handler is about to run."""
        ...

    def step_finished(self, report: StepReport) -> None:
        """A delivery is done, whatever it came to (after ``step_started`` if a handler ran)."""
        ...


@dataclass(slots=True)
class _Run:
    """What a claimed delivery came to, filled in as it goes (read even when it raised)."""

    applied: ResultApplied | None = None
    handler_s: float | None = None


@dataclass(frozen=True)
class StepFailure:
    """A failed attempt, as a :class:`FailureReporter` sees it once its outcome is recorded.

    ``final`` says whether the step will not run again; ``reason`` says why (the reason the
    engine records), None when the step is retried.
    """

    context: StepContext
    outcome: StepOutcome
    final: bool
    reason: str | None


class FailureReporter(Protocol):
    """Receives every failed attempt a :class:`StepExecutor` recorded (error tracking)."""

    def step_failed(self, failure: StepFailure) -> None:
        """Report ``failure``; must not block for long (it runs on the worker's thread)."""
        ...


@dataclass(frozen=True)
class _ClaimRow:
    outcome: str
    state: str | None
    attempt: int | None
    max_attempts: int | None
    name: str | None
    inputs: Any
    task_context: Any
    correlation_id: Any
    parent_results: Any
    lease_left_s: float | None


_CLAIM_ROW = class_row(_ClaimRow)


@dataclass(frozen=True)
class _Completion:
    """What ``tasker.complete_step_v3`` answered (``outcome`` is a :class:`CompletionOutcome`),
    for ``enqueued`` the steps it enqueued, and what is left for after the commit."""

    outcome: str
    task_uuid: Any
    namespace: str | None
    workflow: str | None
    version: str | None
    enqueued: list[Any] | None
    enqueued_names: list[str] | None
    follow_up: str | None


_COMPLETION = class_row(_Completion)


@dataclass(frozen=True)
class _TaskVersion:
    """The template a task was created from (statement ``task_version``)."""

    namespace: str
    workflow: str
    version: str


_TASK_VERSION = class_row(_TaskVersion)


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: the context to run with, or why there is nothing to run."""

    outcome: ClaimOutcome
    state: str | None = None
    attempt: int | None = None
    context: StepContext | None = None
    lease_left_s: float = 0.0


def claim_step(
    conn: Any, runner: StepRunner, task_uuid: str, step_uuid: str, *, token: str, lease_s: float
) -> Claim:
    """Claim the step for the delivery ``token`` with a lease of ``lease_s`` seconds."""
    params = {"step": step_uuid, "token": token, "lease_ms": int(lease_s * 1000)}
    with conn.cursor(row_factory=_CLAIM_ROW) as cursor:
        row = cursor.execute(q("claim_step"), params).fetchone()
    outcome = ClaimOutcome(row.outcome)
    lease_left = float(row.lease_left_s or 0.0)
    if outcome not in (ClaimOutcome.CLAIMED, ClaimOutcome.RECLAIMED, ClaimOutcome.REPEATED):
        return Claim(outcome, row.state, row.attempt, lease_left_s=lease_left)
    if outcome is ClaimOutcome.RECLAIMED:
        logger.warning("Re-claimed step %s: its previous worker stopped renewing it", step_uuid)
    deadline = None
    if runner.timeout is not None:
        try:
            deadline = datetime.now(UTC) + timedelta(seconds=runner.timeout)
        except OverflowError:  # a timeout of centuries is no timeout
            deadline = None
    context = StepContext(
        task_uuid=task_uuid,
        step_uuid=step_uuid,
        step_name=str(row.name),
        namespace=runner.namespace,
        workflow=runner.workflow,
        task_context=row.task_context,
        parent_results=row.parent_results,
        inputs=row.inputs,
        attempt=int(row.attempt or 0),
        max_attempts=int(row.max_attempts or 0),
        correlation_id=str(row.correlation_id),
        deadline=deadline,
    )
    return Claim(outcome, row.state, context.attempt, context, lease_left)


class _HeldClaims:
    """The step claims this process's handlers hold, for the heartbeat: step -> (attempt, since)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[int, float]] = {}

    def hold(self, step_uuid: str, attempt: int) -> None:
        with self._lock:
            self._held[step_uuid] = (attempt, time.monotonic())

    def holds(self, step_uuid: str, younger_than_s: float | None = None) -> bool:
        """Whether a handler here holds the step's claim (one younger than ``younger_than_s``:
        an older one is let go, as :meth:`StepExecutor.extend` no longer renews it)."""
        with self._lock:
            held = self._held.get(step_uuid)
        if held is None:
            return False
        return younger_than_s is None or time.monotonic() - held[1] < younger_than_s

    def drop(self, step_uuid: str, attempt: int) -> None:
        with self._lock:
            if self._held.get(step_uuid, (None,))[0] == attempt:
                del self._held[step_uuid]

    def snapshot(self, younger_than_s: float | None = None) -> list[tuple[str, int]]:
        now = time.monotonic()
        with self._lock:
            return [
                (step, attempt)
                for step, (attempt, since) in self._held.items()
                if younger_than_s is None or now - since < younger_than_s
            ]

    def clear(self) -> list[tuple[str, int]]:
        with self._lock:
            held = [(step, attempt) for step, (attempt, _) in self._held.items()]
            self._held.clear()
        return held


class StepExecutor:
    """Runs step deliveries for one worker process, and keeps their claims alive.

    Parameters:
      connect: lends a connection (a pool's ``connection``).
      sender: sends the messages a recorded outcome causes, on the recording connection.
      lease_s: length of a step claim, renewed by :meth:`extend` (the broker's heartbeat).
      max_lease_s: claims older than this are no longer renewed, so a hung handler lets go.
      retry_window_s: how long a claim is retried when the database is in trouble (seconds).
      record_window_s: how long the outcome of a handler that ran waits for the database to
        take it (an outage longer than this loses the outcome: the message comes back).
      max_payload_bytes: results larger than this (bytes of JSON) fail the step (payload_error).
      breakers: the step breakers (steps whose runner names a breaker pass it).
      database: the process's database breaker, told of every claim and record.
      failure_reporter: told of every failed attempt after its outcome is recorded; what it
        raises is logged and dropped.

    It is also the broker's lease hook (``extend``/``release``), see
    :class:`tasker.brokers.leases.LeaseHook`.
    """

    def __init__(
        self,
        connect: Connect,
        sender: Sender,
        *,
        lease_s: float,
        max_lease_s: float | None = None,
        retry_window_s: float = DEFAULT_RETRY_WINDOW_S,
        record_window_s: float = DEFAULT_RECORD_WINDOW_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        breakers: SharedBreakers | None = None,
        database: DatabaseBreaker | None = None,
        failure_reporter: FailureReporter | None = None,
    ) -> None:
        self.connect = connect
        self.breakers = breakers
        self.database = database
        self.max_payload_bytes = max_payload_bytes
        self.failure_reporter = failure_reporter
        #: Outcomes recorded by this executor that were failures (the worker registry reports
        #: them for the scaling hints' error rate).
        self.failures_recorded = 0
        #: Told about every delivery (the worker's metrics): see :class:`StepObserver`.
        self.observers: list[StepObserver] = []
        self.sender = sender
        self.lease_s = lease_s
        self.max_lease_s = max_lease_s
        self.retry_window_s = retry_window_s
        self.record_window_s = record_window_s
        self._held = _HeldClaims()

    def execute(
        self, runner: StepRunner, *, task_uuid: str, step_uuid: str, delivery: Delivery
    ) -> Settlement:
        """Pass the step's breaker, then claim, run, record and settle one delivery.

        Raises only a transient database error that outlasted ``retry_window_s`` (or
        :class:`~tasker.exceptions.DatabaseUnavailableError` when the database breaker stayed
        open that long): the message is then left for its lease to expire (or for the broker to
        re-send it), never removed.
        """
        passage = None
        if runner.breaker is not None and self.breakers is not None:
            passage = self.breakers.enter(runner.breaker)
            if not passage.run:
                delivery.defer(passage.wait_s)
                logger.debug(
                    "Step %s waits %.1fs: breaker %r", step_uuid, passage.wait_s, passage.name
                )
                self._finished(StepReport(runner, Unclaimed.BREAKER_OPEN))
                return Settlement.DEFERRED
        verdict = _Verdict()
        try:
            return self._execute(runner, task_uuid, step_uuid, delivery, verdict)
        finally:
            if passage is not None:
                self._leave(passage, verdict)

    def _execute(
        self,
        runner: StepRunner,
        task_uuid: str,
        step_uuid: str,
        delivery: Delivery,
        verdict: _Verdict,
    ) -> Settlement:
        if self._held.holds(step_uuid, self.max_lease_s):
            # Another thread of this process runs the step, or holds its outcome until the
            # database takes it (its lease ran out in an outage): that thread settles it, so
            # this redelivery must not re-claim it (an attempt used, or worker_died on the last).
            delivery.defer(self.lease_s + _DEFER_MARGIN_S)
            self._finished(StepReport(runner, ClaimOutcome.BUSY))
            return Settlement.DEFERRED
        claim = self._retrying(
            "claim",
            step_uuid,
            lambda: self._claim(runner, task_uuid, step_uuid, delivery.token),
        )
        if claim.outcome is ClaimOutcome.BUSY:
            delivery.defer(max(claim.lease_left_s, 0.0) + _DEFER_MARGIN_S)
            self._finished(StepReport(runner, claim.outcome, claim.attempt))
            return Settlement.DEFERRED
        if claim.outcome is ClaimOutcome.EXHAUSTED:
            attempt = int(claim.attempt or 0)
            died = worker_died_outcome(attempt)
            applied = self._settle(runner, step_uuid, attempt, died, delivery)
            self._finished(StepReport(runner, claim.outcome, attempt, applied))
            return Settlement.RECORDED
        if claim.context is None:
            logger.info("Skipping step %s: %s (%s)", step_uuid, claim.outcome, claim.state)
            self._finished(StepReport(runner, claim.outcome, claim.attempt))
            return Settlement.SKIPPED
        attempt = claim.context.attempt
        self._held.hold(step_uuid, attempt)
        self._started(runner, attempt)
        run = _Run()
        try:
            self._run_and_settle(
                runner, step_uuid, claim.context, delivery, run=run, verdict=verdict
            )
            return Settlement.RECORDED
        finally:
            self._held.drop(step_uuid, attempt)
            self._finished(StepReport(runner, claim.outcome, attempt, run.applied, run.handler_s))

    def _leave(self, passage: Passage, verdict: _Verdict) -> None:
        """Tell the step's breaker how it went (never fails the step)."""
        assert self.breakers is not None
        try:
            self.breakers.leave(passage, failed=verdict.failed, error=verdict.error)
        except Exception:
            logger.warning("Could not report to breaker %r", passage.name, exc_info=True)

    def _run_and_settle(
        self,
        runner: StepRunner,
        step_uuid: str,
        context: StepContext,
        delivery: Delivery,
        *,
        run: _Run,
        verdict: _Verdict,
    ) -> None:
        """Run the handler once, then record its outcome whatever lands in between.

        Dramatiq's time limit interrupts the thread asynchronously, once per message; when the
        handler returned just before its deadline, the interrupt lands here, and recording starts
        over (it is fenced and idempotent).
        """
        outcome: StepOutcome | None = None
        interrupt: BaseException | None = None
        for _ in range(_MAX_INTERRUPTS):
            try:
                if outcome is None:
                    started = time.perf_counter()
                    try:
                        outcome = run_handler(
                            runner.handler, context, max_bytes=self.max_payload_bytes
                        )
                    finally:
                        run.handler_s = time.perf_counter() - started
                    verdict.judge(outcome)
                run.applied = self._settle(runner, step_uuid, context.attempt, outcome, delivery)
            except Exception:
                raise  # transient (the message comes back); _settle handles every other error
            except BaseException as exc:
                logger.warning(
                    "Step %s: %r landed while recording; recording again", step_uuid, exc
                )
                interrupt = exc
                continue
            if not outcome.success:
                self._report(runner, context, outcome)
            return
        assert interrupt is not None
        raise interrupt

    def _started(self, runner: StepRunner, attempt: int) -> None:
        for observer in self.observers:
            try:
                observer.step_started(runner, attempt)
            except Exception:  # an observer never changes what happens to the step
                logger.exception("Step observer %r failed", observer)

    def _finished(self, report: StepReport) -> None:
        for observer in self.observers:
            try:
                observer.step_finished(report)
            except Exception:
                logger.exception("Step observer %r failed", observer)

    def _report(self, runner: StepRunner, context: StepContext, outcome: StepOutcome) -> None:
        """Tell the failure reporter, if any; its errors (and an interrupt meant for the handler
        landing here) are logged, never raised: the outcome is recorded already."""
        if self.failure_reporter is None:
            return
        reason = final_failure_reason(
            template_retryable=runner.retryable,
            error_retryable=outcome.retryable,
            attempts=context.attempt,
            max_attempts=context.max_attempts,
        )
        failure = StepFailure(context, outcome, final=reason is not None, reason=reason)
        try:
            self.failure_reporter.step_failed(failure)
        except BaseException:
            logger.warning(
                "Could not report the failure of step %s attempt %d",
                context.step_uuid,
                context.attempt,
                exc_info=True,
            )

    def _claim(self, runner: StepRunner, task_uuid: str, step_uuid: str, token: str) -> Claim:
        with self.connect() as conn:
            return claim_step(conn, runner, task_uuid, step_uuid, token=token, lease_s=self.lease_s)

    def _settle(
        self,
        runner: StepRunner,
        step_uuid: str,
        attempt: int,
        outcome: StepOutcome,
        delivery: Delivery,
    ) -> ResultApplied | None:
        """Record ``outcome``; if the database refuses it, a permanent failure saying why; if
        that is refused too, the minimal document. Transient errors propagate. Returns where it
        left the step (None: the attempt had lost its claim)."""
        try:
            return self._record(runner, step_uuid, attempt, outcome, delivery)
        except Exception as exc:
            if _passes(exc):
                raise
            logger.error(
                "Step %s attempt %d: the outcome could not be recorded (%s: %s); recording a "
                "permanent failure instead",
                step_uuid,
                attempt,
                type(exc).__name__,
                exc,
            )
            where = "result" if outcome.success and is_data_error(exc) else "record"
            refused = refused_outcome(attempt, exc, where=where)
        try:
            return self._record(runner, step_uuid, attempt, refused, delivery)
        except Exception as exc:
            if _passes(exc):
                raise
            logger.exception("Step %s attempt %d: recording the failure failed", step_uuid, attempt)
            cause: BaseException = exc
        return self._retrying(
            "record",
            step_uuid,
            lambda: self._record_minimal(step_uuid, attempt, cause, delivery),
            window_s=self.record_window_s,
        )

    def _record(
        self, runner: StepRunner, step_uuid: str, attempt: int, outcome: StepOutcome, delivery: Any
    ) -> ResultApplied | None:
        def once() -> ResultApplied | None:
            with self.connect() as conn, conn.transaction():
                applied = record_outcome(
                    conn, self.sender, step_uuid, attempt, outcome, inline=runner.inline
                )
                delivery.settle_in(conn)  # fenced: removes nothing if the lease was lost
            delivery.mark_settled()
            if not outcome.success:
                self.failures_recorded += 1
            return applied

        applied = self._retrying("record", step_uuid, once, window_s=self.record_window_s)
        if applied is not None and applied.follow_up is not None:
            applied = self._follow_up(applied, applied.follow_up)
        return applied

    def _follow_up(self, applied: ResultApplied, work: FollowUp) -> ResultApplied:
        """Run what the completion left for after its commit. The outcome is recorded and the
        message gone: a failure here is logged, and the recovery sweep moves the task on."""
        try:
            task_state = self._retrying(
                "follow up",
                str(work.step_uuid),
                lambda: self._follow_up_once(work),
            )
        except Exception:
            logger.warning(
                "Step %s: its task's next move after the completion failed; the recovery sweep "
                "will make it",
                work.step_uuid,
                exc_info=True,
            )
            return applied
        return ResultApplied(applied.step_state, task_state or applied.task_state)

    def _follow_up_once(self, work: FollowUp) -> str | None:
        with self.connect() as conn:
            return follow_up(conn, self.sender, work)

    def _record_minimal(
        self, step_uuid: str, attempt: int, cause: BaseException, delivery: Delivery
    ) -> ResultApplied | None:
        document = minimal_failure_document(attempt, cause)
        params = {"step": step_uuid, "attempt": attempt, "results": document}
        with self.connect() as conn, conn.transaction():
            row = conn.execute(q("fail_step_minimal"), params).fetchone()
            if row is not None:
                move_steps(
                    conn,
                    [step_uuid],
                    [StepState.IN_PROGRESS],
                    StepState.ERROR,
                    attempt=attempt,
                    reason="outcome not recordable",
                )
                self.sender.send_stage(conn, STEP_ENQUEUE, str(row[0]))
            delivery.settle_in(conn)
        delivery.mark_settled()
        return None if row is None else ResultApplied(StepState.ERROR)

    def _retrying(
        self, what: str, step_uuid: str, action: Callable[[], T], *, window_s: float | None = None
    ) -> T:
        """Run ``action``; retry transient database errors with backoff within ``window_s``
        seconds (default: ``retry_window_s``).

        While the database breaker is open, the next try waits for it instead (within the same
        window). An interrupt meant for the handler (Dramatiq's time limit raises
        ``TimeLimitExceeded`` asynchronously, once, and it may land just after the handler
        returned) is not the action's failure: the action runs again at once, a few times at
        most.
        """
        window = self.retry_window_s if window_s is None else window_s
        deadline = time.monotonic() + window
        pause = 0.05
        interrupts = 0
        while True:
            self._wait_for_database(what, step_uuid, deadline, window)
            try:
                result = action()
            except Exception as exc:
                if self.database is not None:
                    self.database.record_failure(exc)
                if not is_transient(exc) or time.monotonic() + pause > deadline:
                    raise
                logger.warning(
                    "The %s of step %s failed (%s); retrying in %.2fs on a fresh connection",
                    what,
                    step_uuid,
                    exc,
                    pause,
                )
            except BaseException as exc:  # an asynchronous interrupt, not a database answer
                interrupts += 1
                if interrupts > _MAX_INTERRUPTS:
                    raise
                logger.warning(
                    "The %s of step %s was interrupted by %s; repeating it",
                    what,
                    step_uuid,
                    type(exc).__name__,
                )
                continue
            else:
                if self.database is not None:
                    self.database.record_success()
                return result
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _wait_for_database(self, what: str, step_uuid: str, deadline: float, window: float) -> None:
        """Return once the database breaker lets a statement through; raise
        :class:`DatabaseUnavailableError` if it is still open at ``deadline``."""
        breaker = self.database
        if breaker is None:
            return
        while not breaker.allow():
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnavailableError(
                    f"The {what} of step {step_uuid} waited {window:g}s for the "
                    "database breaker to close; its message comes back when PostgreSQL does."
                )
            breaker.wait(left)

    # -- the heartbeat's lease hook ------------------------------------------------------------

    def extend(self) -> None:
        """Renew the claims of the handlers running in this process (one statement)."""
        held = self._held.snapshot(self.max_lease_s)
        if held:
            self._write_claims("extend_step_claims", held)

    def release(self) -> None:
        """Give up every claim at once (a forced exit): the steps may be re-claimed now, as the
        same attempt (this worker gave them up; they did not fail). A handler still running here
        can no longer record anything: its attempt is fenced off."""
        held = self._held.clear()
        if held:
            self._write_claims("release_step_claims", held)

    def _write_claims(self, statement: str, held: list[tuple[str, int]]) -> None:
        params = {
            "steps": [step for step, _ in held],
            "attempts": [attempt for _, attempt in held],
            "lease_ms": int(self.lease_s * 1000),
        }
        with self.connect() as conn:
            conn.execute(q(statement), params)


class _Verdict:
    """What a delivery's outcome means for its step's breaker: ``failed`` True (it counts),
    False (a success) or None (nothing ran, or an outcome that says nothing about the
    downstream: a payload error, a ``PermanentError``, a shutdown)."""

    def __init__(self) -> None:
        self.failed: bool | None = None
        self.error: str | None = None

    def judge(self, outcome: StepOutcome) -> None:
        if outcome.success:
            self.failed = False
        elif outcome.trips_breaker:
            self.failed, self.error = True, outcome.error_type


def _passes(exc: BaseException) -> bool:
    """Database trouble that passes: the message must come back, nothing be recorded."""
    return is_transient(exc) or isinstance(exc, DatabaseUnavailableError)


def record_outcome(
    conn: Any,
    sender: Sender,
    step_uuid: str,
    attempt: int,
    outcome: StepOutcome,
    *,
    inline: bool,
) -> ResultApplied | None:
    """Store the outcome and process it (inline) or hand it on; returns where that left the
    step and its task, or None if the attempt had lost its claim (nothing stored)."""
    if outcome.success and inline:
        return _complete_inline(conn, sender, step_uuid, attempt, outcome)
    to = (
        StepState.ENQUEUED_FOR_ORCHESTRATION
        if outcome.success
        else StepState.ENQUEUED_AS_ERROR_FOR_ORCHESTRATION
    )
    row = conn.execute(
        q("finish_step"),
        {"step": step_uuid, "to": to, "results": outcome.document, "attempt": attempt},
    ).fetchone()
    if row is None:
        logger.warning(
            "Step %s attempt %d lost its claim; its outcome is dropped", step_uuid, attempt
        )
        return None
    move_steps(conn, [step_uuid], [StepState.IN_PROGRESS], to, attempt=attempt)
    if not inline:
        sender.send_stage(conn, PROCESS_RESULT, str(row[0]), step_uuid)
        return ResultApplied(to)
    return apply_result(conn, sender, row[0], step_uuid) or ResultApplied(to)


def _complete_inline(
    conn: Any, sender: Sender, step_uuid: str, attempt: int, outcome: StepOutcome
) -> ResultApplied | None:
    """The fast path of a success: one call of ``tasker.complete_step_v3``, then the messages;
    what it leaves for after the commit is in the answer's ``follow_up``."""
    params = {"step": step_uuid, "attempt": attempt, "results": outcome.document}
    with conn.cursor(row_factory=_COMPLETION) as cursor:
        done: _Completion = cursor.execute(q("complete_step_fast"), params).fetchone()
    if done.outcome == CompletionOutcome.LOST:
        logger.warning(
            "Step %s attempt %d lost its claim; its outcome is dropped", step_uuid, attempt
        )
        return None
    task_state = None
    if done.outcome == CompletionOutcome.ENQUEUED:
        pairs = list(zip(done.enqueued or (), done.enqueued_names or (), strict=True))
        sender.send_steps(
            conn,
            step_messages(
                str(done.namespace), str(done.workflow), str(done.version), done.task_uuid, pairs
            ),
        )
    elif done.outcome == CompletionOutcome.FINALIZE:  # every step complete; the task is locked
        task_state = finish_task(conn, sender, done.task_uuid, TaskState.EVALUATING_RESULTS)
    elif done.outcome == CompletionOutcome.EVALUATE:  # the general path; the task is locked
        task_state = reevaluate_task(conn, sender, done.task_uuid)
    after = None
    if done.follow_up is not None:
        after = FollowUp(
            done.follow_up,
            done.task_uuid,
            step_uuid,
            str(done.namespace),
            str(done.workflow),
            str(done.version),
        )
    return ResultApplied(StepState.COMPLETE, task_state, after)


def task_version(conn: Any, task_uuid: str) -> str | None:
    """The template version a task was created from (None: no such task)."""
    with conn.cursor(row_factory=_TASK_VERSION) as cursor:
        row: _TaskVersion | None = cursor.execute(q("task_version"), {"task": task_uuid}).fetchone()
    return None if row is None else str(row.version)


def mark_step_waiting(conn: Any, step_uuid: str, why: str) -> None:
    """Show on an ``enqueued`` step why its message waits (``waiting_for``, ``waiting_since``);
    the claim clears both."""
    conn.execute(q("mark_step_waiting"), {"step": step_uuid, "why": why})

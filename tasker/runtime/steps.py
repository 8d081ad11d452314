"""Workflow steps as Dramatiq actors: one thin actor per step of each workflow version.

* Each step of each loaded workflow version is an actor named
  ``tasker.<namespace>.<workflow>@<version>.<step>`` on the queue ``worker_<namespace>_queue``, so
  a worker that loads v1 and v2 runs v1's handler for v1 tasks and v2's for v2 tasks. The actor
  hands its delivery to :class:`tasker.engine.steps.StepExecutor`, which does the rest.
* Messages queued by older releases carry the unversioned name
  ``tasker.<namespace>.<workflow>.<step>``: an actor of that name reads the task's version and
  runs that version's handler, so an upgrade strands nothing.
* A step message this worker has no handler for (an older worker during a rolling deploy, a
  renamed handler, a version not loaded here) is not dead-lettered: it goes back to its queue with
  a growing delay for a worker that has it, using no attempt, and the step shows what it waits for
  (``StepStatus.waiting_for``).
* A step declared with a ``breaker`` passes that shared breaker (:mod:`tasker.breakers.shared`)
  before its claim; the executor also reports to the broker's database breaker.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from typing import Any

import dramatiq
from dramatiq.errors import Retry
from dramatiq.message import Message
from dramatiq.middleware import CurrentMessage

from tasker.breakers.shared import SharedBreakers
from tasker.brokers.pgmq import PGMQBroker, PGMQMessageProxy
from tasker.db.errors import is_transient
from tasker.engine.steps import StepExecutor, StepRunner, mark_step_waiting, task_version
from tasker.exceptions import DatabaseUnavailableError
from tasker.runtime.sender import BrokerSender
from tasker.workflow.definition import (
    StepDefinition,
    Workflow,
    legacy_step_actor_name,
)

__all__ = ["StepActors", "existing_step_executor", "step_actors", "step_executor"]

logger = logging.getLogger(__name__)

_MIN_BACKOFF_MS = 500
_MAX_BACKOFF_MS = 30_000
_ASYNC_TIME_LIMIT_GRACE_S = 5.0
#: Delays of a delivery waiting for a worker that has its handler: 1 s doubling up to 30 s.
_WAIT_FIRST_MS = 1_000
_WAIT_MAX_MS = 30_000
_STEP_ACTOR_PREFIX = "tasker."


def _retry_step(retries: int, exc: BaseException) -> bool:
    """A step message is never dead-lettered: the step executor records every outcome it can,
    so what escapes it is transient database trouble, or a bug that a later delivery may not meet
    (its claim counts the attempts, and fails the step when they run out)."""
    if not (isinstance(exc, DatabaseUnavailableError) or is_transient(exc)):
        logger.error("A step actor raised %r; its message is retried later", exc)
    return True


class _Delivery:
    """The engine's view (:class:`tasker.engine.steps.Delivery`) of the message being run."""

    def __init__(self, broker: PGMQBroker, message: Any) -> None:
        self._broker = broker
        self._message = message

    @property
    def token(self) -> str:
        if isinstance(self._message, PGMQMessageProxy):
            return self._message.token
        return str(getattr(self._message, "message_id", ""))

    def settle_in(self, conn: Any) -> None:
        if isinstance(self._message, PGMQMessageProxy):
            self._broker.delete_in_transaction(conn, self._message)

    def mark_settled(self) -> None:
        if isinstance(self._message, PGMQMessageProxy):
            self._message.settled = True

    def defer(self, delay_s: float) -> None:
        if isinstance(self._message, PGMQMessageProxy):
            self._broker.defer(self._message, int(delay_s * 1000))
        else:  # another broker: let Dramatiq's Retries re-send it
            raise Retry(delay=int(delay_s * 1000))


class StepActors:
    """The step actors of one broker, their runners per workflow version, and their executor."""

    def __init__(self, broker: PGMQBroker) -> None:
        self.broker = broker
        self.sender = BrokerSender(broker)
        #: The step breakers of this broker's steps (configure them with ``install``).
        self.breakers = SharedBreakers(broker.pool.connection)
        self.executor = StepExecutor(
            broker.pool.connection,
            self.sender,
            lease_s=broker.visibility_timeout_ms / 1000,
            max_lease_s=broker.max_lease_ms / 1000,
            breakers=self.breakers,
            database=broker.database_breaker,
        )
        broker.lease_hooks.append(self.executor)
        broker.unknown_actor_hooks.append(self._note_unknown_actor)
        self._runners: dict[tuple[str, str, str, str], StepRunner] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def bind(self, flow: Workflow, step: StepDefinition, *, inline: bool) -> None:
        """Declare the actor of ``step`` of this version of ``flow`` (idempotent), and the
        unversioned actor older releases' messages name."""
        actor_name = flow.actor_name(step.name)
        if actor_name in self.broker.actors or step.handler is None:
            return
        runner = StepRunner(
            flow.namespace,
            flow.name,
            step.handler,
            timeout=step.timeout,
            inline=inline,
            breaker=step.breaker,
            retryable=step.retryable,
            step=step.name,
        )
        if step.breaker is not None:
            self.breakers.register(step.breaker)
        self._runners[(flow.namespace, flow.name, flow.version, step.name)] = runner

        def run(task_uuid: str, step_uuid: str) -> None:
            self.execute(runner, task_uuid, step_uuid)

        run.__name__ = step.name
        self._declare(actor_name, flow.queue_name, run, _time_limit(step))
        legacy = legacy_step_actor_name(flow.namespace, flow.name, step.name)
        if legacy not in self.broker.actors:

            def run_legacy(task_uuid: str, step_uuid: str) -> None:
                self._run_legacy(flow.namespace, flow.name, step.name, task_uuid, step_uuid)

            run_legacy.__name__ = f"{step.name}_unversioned"
            self._declare(legacy, flow.queue_name, run_legacy, _time_limit(step))

    def execute(self, runner: StepRunner, task_uuid: str, step_uuid: str) -> None:
        """Run one delivery of the current message through the executor."""
        delivery = _Delivery(self.broker, CurrentMessage.get_current_message())
        self.executor.execute(runner, task_uuid=task_uuid, step_uuid=step_uuid, delivery=delivery)

    def _declare(self, name: str, queue: str, fn: Any, options: dict[str, Any]) -> None:
        dramatiq.actor(
            broker=self.broker,
            actor_name=name,
            queue_name=queue,
            poison_check=False,  # the claim counts attempts and fails the step when they run out
            retry_when=_retry_step,
            min_backoff=_MIN_BACKOFF_MS,
            max_backoff=_MAX_BACKOFF_MS,
            **options,
        )(fn)

    def _run_legacy(
        self, namespace: str, workflow: str, step: str, task_uuid: str, step_uuid: str
    ) -> None:
        """An unversioned message: run the handler of the version its task records."""
        with self.broker.pool.connection() as conn:
            version = task_version(conn, task_uuid)
        if version is None:
            logger.info("Dropping a message of step %s: its task no longer exists", step_uuid)
            return
        runner = self._runners.get((namespace, workflow, version, step))
        if runner is not None:
            self.execute(runner, task_uuid, step_uuid)
            return
        message: Any = CurrentMessage.get_current_message()
        self._wait(f"a worker that runs {namespace}/{workflow} version {version}", step_uuid)
        if isinstance(message, PGMQMessageProxy):
            self.broker.defer(message, _wait_delay_ms(message.read_ct))

    def _note_unknown_actor(self, message: Message[Any]) -> None:
        """The broker put back a message for an actor this worker lacks: show it on the step."""
        if message.actor_name.startswith(_STEP_ACTOR_PREFIX) and len(message.args) == 2:
            why = f"a worker that has actor {message.actor_name}"
            self._wait(why, str(message.args[1]), log=False)  # the broker logged it

    def _wait(self, why: str, step_uuid: str, *, log: bool = True) -> None:
        with self._lock:
            first = why not in self._logged
            self._logged.add(why)
        if first and log:
            logger.warning(
                "Step messages wait for %s (this worker has no handler for them: a rolling "
                "deploy, or a renamed handler?); they come back with a growing delay",
                why,
            )
        try:
            with self.broker.pool.connection() as conn:
                mark_step_waiting(conn, step_uuid, why)
        except Exception:  # showing the wait is a courtesy; the message waits either way
            logger.debug("Could not mark step %s as waiting", step_uuid, exc_info=True)


def _time_limit(step: StepDefinition) -> dict[str, Any]:
    """Dramatiq interrupts sync handlers at the limit; async ones are cancelled by the engine at
    the step's deadline, so Dramatiq's limit only backs that up."""
    if step.timeout is None:
        return {}
    grace = _ASYNC_TIME_LIMIT_GRACE_S if inspect.iscoroutinefunction(step.handler) else 0.0
    return {"time_limit": int((step.timeout + grace) * 1000)}


def _wait_delay_ms(read_ct: int) -> int:
    return int(min(_WAIT_FIRST_MS * 2 ** min(max(read_ct - 1, 0), 10), _WAIT_MAX_MS))


_ACTORS: weakref.WeakKeyDictionary[PGMQBroker, StepActors] = weakref.WeakKeyDictionary()


def step_actors(broker: PGMQBroker) -> StepActors:
    """The step actors of ``broker`` (made on first use)."""
    actors = _ACTORS.get(broker)
    if actors is None:
        actors = _ACTORS[broker] = StepActors(broker)
    return actors


def existing_step_executor(broker: PGMQBroker) -> StepExecutor | None:
    """The broker's step executor if its step actors exist, else None."""
    actors = _ACTORS.get(broker)
    return None if actors is None else actors.executor


def step_executor(broker: PGMQBroker) -> StepExecutor:
    """The broker's step executor (its claims ride the broker's heartbeat)."""
    return step_actors(broker).executor

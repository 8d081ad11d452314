"""Workflows as Dramatiq actors: one thin actor per step, plus the four orchestration stages.

* Every step of every :class:`~tasker.workflow.definition.Workflow` becomes an actor named
  ``tasker.<namespace>.<workflow>.<step>`` on the queue ``worker_<namespace>_queue``; the actor
  hands its delivery to :func:`tasker.engine.steps.execute_step`, which does the rest.
* The stages run on the orchestration queues: task requests, step (re-)enqueueing, result
  processing (decoupled mode) and finalization (under an atomic claim, applied by
  :class:`~tasker.middleware.finalization.FinalizationClaim`).
* Workers register the templates of the workflows they run when they boot
  (:class:`~tasker.middleware.templates.TemplateRegistrar`).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.errors import Retry
from dramatiq.middleware import CurrentMessage

from tasker.brokers.pgmq import PGMQBroker, PGMQMessageProxy
from tasker.db.errors import is_transient
from tasker.engine.finalize import DEFAULT_CLAIM_LEASE_S, finalize_task
from tasker.engine.messages import (
    FINALIZE,
    PROCESS_RESULT,
    STEP_ENQUEUE,
    TASK_REQUEST,
    OrchestrationStage,
)
from tasker.engine.payloads import MAX_PAYLOAD_BYTES
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.steps import StepExecutor, StepRunner
from tasker.engine.tasks import TaskRequest, create_task
from tasker.exceptions import DatabaseUnavailableError
from tasker.middleware.finalization import FinalizationClaim
from tasker.middleware.templates import TemplateRegistrar
from tasker.runtime.sender import BrokerSender
from tasker.workflow.definition import StepDefinition, Workflow, on_step_declared

__all__ = [
    "BrokerSender",
    "FinalizationClaim",
    "bind_step",
    "bind_workflow",
    "install",
    "step_executor",
]

logger = logging.getLogger(__name__)

_MIN_BACKOFF_MS = 500
_MAX_BACKOFF_MS = 30_000
_ASYNC_TIME_LIMIT_GRACE_S = 5.0
Fn = Callable[..., Any]


def _retry_step(retries: int, exc: BaseException) -> bool:
    """A step message is never dead-lettered: the step executor records every outcome it can,
    so what escapes it is transient database trouble, or a bug that a later delivery may not meet
    (its claim counts the attempts, and fails the step when they run out)."""
    if not (isinstance(exc, DatabaseUnavailableError) or is_transient(exc)):
        logger.error("A step actor raised %r; its message is retried later", exc)
    return True


def _retry_transient(retries: int, exc: BaseException) -> bool:
    """Step and stage actors retry database trouble for as long as it lasts (each retry replaces
    the delivery atomically, so nothing is lost meanwhile); anything else is a bug to see in the
    dead-letter queue, never retried blindly."""
    return isinstance(exc, DatabaseUnavailableError) or is_transient(exc)


def install(
    broker: PGMQBroker,
    *,
    inline: bool = True,
    finalization_lease_s: int = DEFAULT_CLAIM_LEASE_S,
    bind_workflows: bool = True,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> BrokerSender:
    """Declare the orchestration actors on ``broker``; with ``bind_workflows``, every workflow
    step defined in this process, now or later, becomes an actor on it. Step results over
    ``max_payload_bytes`` bytes of JSON fail their step."""
    step_executor(broker).max_payload_bytes = max_payload_bytes
    if not any(isinstance(m, CurrentMessage) for m in broker.middleware):
        broker.add_middleware(CurrentMessage())
    broker.add_middleware(FinalizationClaim(broker, lease_s=finalization_lease_s))
    broker.add_middleware(TemplateRegistrar(broker))
    sender = BrokerSender(broker)
    _declare_stages(broker, sender)
    if bind_workflows:
        on_step_declared(lambda flow, step: bind_step(broker, sender, flow, step, inline=inline))
    return sender


def bind_workflow(broker: PGMQBroker, flow: Workflow, *, inline: bool = True) -> None:
    """Make every step of ``flow`` an actor on ``broker`` (``install`` does it automatically)."""
    sender = BrokerSender(broker)
    for step in flow.steps.values():
        bind_step(broker, sender, flow, step, inline=inline)


def _declare_stages(broker: PGMQBroker, sender: BrokerSender) -> None:
    def stage(definition: OrchestrationStage, **options: Any) -> Callable[[Fn], Any]:
        return dramatiq.actor(
            broker=broker,
            actor_name=definition.actor,
            queue_name=definition.queue,
            retry_when=_retry_transient,
            min_backoff=_MIN_BACKOFF_MS,
            max_backoff=_MAX_BACKOFF_MS,
            **options,
        )

    @stage(TASK_REQUEST)
    def task_request(request: dict[str, Any]) -> str:
        with broker.pool.connection() as conn:
            return create_task(conn, sender, TaskRequest(**request)).task_uuid

    @stage(STEP_ENQUEUE)
    def enqueue_steps(task_uuid: str) -> None:
        with broker.pool.connection() as conn:
            reevaluate_task(conn, sender, task_uuid)

    @stage(PROCESS_RESULT)
    def process_step_result(task_uuid: str, step_uuid: str) -> None:
        with broker.pool.connection() as conn:
            process_result(conn, sender, task_uuid, step_uuid)

    @stage(FINALIZE, finalization_claim=True)
    def finalize(task_uuid: str) -> None:
        with broker.pool.connection() as conn:
            final = finalize_task(conn, task_uuid)
        if final:
            logger.info("Task %s finalized: %s", task_uuid, final)


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


_EXECUTORS: weakref.WeakKeyDictionary[PGMQBroker, StepExecutor] = weakref.WeakKeyDictionary()


def step_executor(broker: PGMQBroker) -> StepExecutor:
    """The broker's step executor (made on first use; its claims ride the broker's heartbeat)."""
    executor = _EXECUTORS.get(broker)
    if executor is None:
        executor = StepExecutor(
            broker.pool.connection,
            BrokerSender(broker),
            lease_s=broker.visibility_timeout_ms / 1000,
            max_lease_s=broker.max_lease_ms / 1000,
        )
        broker.lease_hooks.append(executor)
        _EXECUTORS[broker] = executor
    return executor


def bind_step(
    broker: PGMQBroker,
    sender: BrokerSender,
    flow: Workflow,
    step: StepDefinition,
    *,
    inline: bool,
) -> None:
    """Declare the actor that runs ``step`` of ``flow`` (idempotent)."""
    actor_name = flow.actor_name(step.name)
    if actor_name in broker.actors or step.handler is None:
        return
    handler = step.handler
    runner = StepRunner(flow.namespace, flow.name, handler, timeout=step.timeout, inline=inline)
    executor = step_executor(broker)
    options: dict[str, Any] = {}
    if step.timeout is not None:
        # Dramatiq interrupts sync handlers at the limit; async ones are cancelled by the engine
        # at the step's deadline, so Dramatiq's limit only backs that up.
        grace = _ASYNC_TIME_LIMIT_GRACE_S if inspect.iscoroutinefunction(handler) else 0
        options["time_limit"] = int((step.timeout + grace) * 1000)

    def run(task_uuid: str, step_uuid: str) -> None:
        delivery = _Delivery(broker, CurrentMessage.get_current_message())
        executor.execute(runner, task_uuid=task_uuid, step_uuid=step_uuid, delivery=delivery)

    run.__name__ = step.name
    dramatiq.actor(
        broker=broker,
        actor_name=actor_name,
        queue_name=flow.queue_name,
        poison_check=False,  # the claim counts attempts and fails the step when they run out
        retry_when=_retry_step,
        min_backoff=_MIN_BACKOFF_MS,
        max_backoff=_MAX_BACKOFF_MS,
        **options,
    )(run)

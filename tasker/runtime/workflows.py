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

import logging
from collections.abc import Callable
from typing import Any

import dramatiq
import psycopg
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import CurrentMessage

from tasker.brokers.pgmq import PGMQBroker, PGMQMessageProxy
from tasker.engine.finalize import DEFAULT_CLAIM_LEASE_S, finalize_task
from tasker.engine.messages import (
    FINALIZE,
    PROCESS_RESULT,
    STEP_ENQUEUE,
    TASK_REQUEST,
    OrchestrationStage,
)
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.steps import StepRunner, execute_step
from tasker.engine.tasks import TaskRequest, create_task
from tasker.middleware.finalization import FinalizationClaim
from tasker.middleware.templates import TemplateRegistrar
from tasker.runtime.sender import BrokerSender
from tasker.workflow.definition import StepDefinition, Workflow, on_step_declared

__all__ = ["BrokerSender", "FinalizationClaim", "bind_step", "bind_workflow", "install"]

logger = logging.getLogger(__name__)

_INFRA_RETRIES = 20
Fn = Callable[..., Any]


def _retry_on_infrastructure(retries: int, exc: BaseException) -> bool:
    """Orchestration actors retry only database trouble; everything else is a bug to see."""
    return retries < _INFRA_RETRIES and isinstance(
        exc, (psycopg.OperationalError, ConnectionClosed)
    )


def install(
    broker: PGMQBroker,
    *,
    inline: bool = True,
    finalization_lease_s: int = DEFAULT_CLAIM_LEASE_S,
    bind_workflows: bool = True,
) -> BrokerSender:
    """Declare the orchestration actors on ``broker``; with ``bind_workflows``, every workflow
    step defined in this process, now or later, becomes an actor on it."""
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
            max_retries=_INFRA_RETRIES,
            retry_when=_retry_on_infrastructure,
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
    def redelivered(self) -> bool:
        return bool(getattr(self._message, "redelivered", False))

    def settle_in(self, conn: Any) -> None:
        if isinstance(self._message, PGMQMessageProxy):
            self._broker.delete_in_transaction(conn, self._message)

    def mark_settled(self) -> None:
        if isinstance(self._message, PGMQMessageProxy):
            self._message.settled = True


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
    runner = StepRunner(flow.namespace, flow.name, step.handler, inline=inline)
    options: dict[str, Any] = {}
    if step.timeout is not None:
        options["time_limit"] = int(step.timeout * 1000)

    def run(task_uuid: str, step_uuid: str) -> None:
        delivery = _Delivery(broker, CurrentMessage.get_current_message())
        execute_step(
            runner,
            broker.pool.connection,
            sender,
            task_uuid=task_uuid,
            step_uuid=step_uuid,
            delivery=delivery,
        )

    run.__name__ = step.name
    dramatiq.actor(
        broker=broker,
        actor_name=actor_name,
        queue_name=flow.queue_name,
        max_retries=_INFRA_RETRIES,
        retry_when=_retry_on_infrastructure,
        **options,
    )(run)

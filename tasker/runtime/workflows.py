"""Workflows as Dramatiq actors: one actor per step, plus the four orchestration stages.

* Every step of every :class:`~tasker.workflow.definition.Workflow` becomes an actor named
  ``tasker.<namespace>.<workflow>.<step>`` on the queue ``worker_<namespace>_queue``.
* The stages run on the orchestration queues: task requests, step (re-)enqueueing, result
  processing (decoupled mode) and finalization (under an atomic claim, applied by
  :class:`FinalizationClaim`).
* Workers register the templates of the workflows they run when they boot.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
import psycopg
from dramatiq.broker import Broker, MessageProxy
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import CurrentMessage, Middleware, SkipMessage

from tasker.brokers.pgmq import PGMQBroker, PGMQMessageProxy
from tasker.engine.finalize import (
    DEFAULT_CLAIM_LEASE_S,
    claim_finalization,
    finalize_task,
    release_finalization,
)
from tasker.engine.messages import (
    FINALIZE,
    PROCESS_RESULT,
    STEP_ENQUEUE,
    TASK_REQUEST,
    OrchestrationStage,
    StepMessage,
)
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.steps import claim_step, record_exhausted, record_outcome, run_handler
from tasker.engine.tasks import TaskRequest, create_task
from tasker.engine.templates import register_template
from tasker.workflow.definition import (
    StepDefinition,
    Workflow,
    on_step_declared,
    registered_workflows,
)

__all__ = ["BrokerSender", "FinalizationClaim", "bind_workflow", "install"]

logger = logging.getLogger(__name__)

_INFRA_RETRIES = 20
Fn = Callable[..., Any]


def _retry_on_infrastructure(retries: int, exc: BaseException) -> bool:
    """Orchestration actors retry only database trouble; everything else is a bug to see."""
    return retries < _INFRA_RETRIES and isinstance(
        exc, (psycopg.OperationalError, ConnectionClosed)
    )


class BrokerSender:
    """Sends engine messages through a PGMQBroker on the caller's connection."""

    def __init__(self, broker: PGMQBroker) -> None:
        self.broker = broker

    def send_steps(self, conn: Any, steps: Sequence[StepMessage]) -> None:
        messages: list[Message[Any]] = []
        for step in steps:
            self.broker.declare_queue(step.queue)
            messages.append(
                Message(
                    queue_name=step.queue,
                    actor_name=step.actor,
                    args=(step.task_uuid, step.step_uuid),
                    kwargs={},
                    options={},
                )
            )
        with self.broker.use_connection(conn):
            if len(messages) == 1:
                self.broker.enqueue(messages[0])
            elif messages:
                self.broker.enqueue_batch(messages)

    def send_stage(
        self, conn: Any, stage: OrchestrationStage, *args: Any, delay_ms: int = 0
    ) -> None:
        self.broker.declare_queue(stage.queue)
        message: Message[Any] = Message(
            queue_name=stage.queue, actor_name=stage.actor, args=args, kwargs={}, options={}
        )
        with self.broker.use_connection(conn):
            self.broker.enqueue(message, delay=delay_ms or None)


class FinalizationClaim(Middleware):
    """Runs actors with ``finalization_claim=True`` only under the task's finalization claim.

    A finalizer that finds the claim held elsewhere skips (counted as contention) and schedules
    one re-check after the lease, in case the holder dies before finishing.
    """

    def __init__(self, broker: PGMQBroker, *, lease_s: int = DEFAULT_CLAIM_LEASE_S) -> None:
        self.pgmq = broker
        self.lease_s = lease_s
        self.attempts = 0
        self.contention = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def actor_options(self) -> set[str]:
        return {"finalization_claim"}

    def _wants_claim(self, broker: Broker, message: MessageProxy) -> bool:
        actor = broker.get_actor(message.actor_name)
        return bool(actor.options.get("finalization_claim", False))

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if not self._wants_claim(broker, message):
            return
        task_uuid = message.args[0]
        holder = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        with self.pgmq.pool.connection() as conn:
            result = claim_finalization(conn, task_uuid, holder, self.lease_s)
            with self._lock:
                self.attempts += 1
                if not result.claimed:
                    self.contention += 1
            if not result.claimed:
                BrokerSender(self.pgmq).send_stage(
                    conn, FINALIZE, task_uuid, delay_ms=self.lease_s * 1000
                )
                raise SkipMessage(f"finalization of {task_uuid} is claimed by {result.held_by}")
        self._local.claim = (task_uuid, holder)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        claim = getattr(self._local, "claim", None)
        if claim is None:
            return
        self._local.claim = None
        with self.pgmq.pool.connection() as conn:
            release_finalization(conn, *claim)


class _TemplateRegistrar(Middleware):
    """Registers the templates of this process's workflows when a worker boots."""

    def __init__(self, broker: PGMQBroker) -> None:
        self.pgmq = broker

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        flows = registered_workflows()
        with self.pgmq.pool.connection() as conn:
            for flow in flows:
                register_template(conn, flow)
            autovacuum = conn.execute("SHOW autovacuum").fetchone()
        logger.info("Registered %d workflow template(s)", len(flows))
        if autovacuum and autovacuum[0] == "off":
            logger.warning(
                "autovacuum is off on this PostgreSQL: queue tables bloat and the planner's "
                "statistics go stale, which makes every step slower. Turn it on, or run "
                "VACUUM ANALYZE on the pgmq and tasker schemas regularly."
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
    broker.add_middleware(_TemplateRegistrar(broker))
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
    options: dict[str, Any] = {}
    if step.timeout is not None:
        options["time_limit"] = int(step.timeout * 1000)

    def run(task_uuid: str, step_uuid: str) -> None:
        message = CurrentMessage.get_current_message()
        redelivered = bool(getattr(message, "redelivered", False))
        with broker.pool.connection() as conn:
            claim = claim_step(
                conn, flow.namespace, flow.name, task_uuid, step_uuid, redelivered=redelivered
            )
            if claim.exhausted:
                with conn.transaction():
                    record_exhausted(conn, sender, step_uuid, inline=inline)
                    _settle(broker, conn, message)
                _mark_settled(message)
                return
        if claim.context is None:
            logger.info("Skipping step %s: %s", step_uuid, claim.skipped)
            return
        outcome = run_handler(handler, claim.context)
        with broker.pool.connection() as conn, conn.transaction():
            record_outcome(conn, sender, step_uuid, claim.context.attempt, outcome, inline=inline)
            _settle(broker, conn, message)
        _mark_settled(message)

    run.__name__ = step.name
    dramatiq.actor(
        broker=broker,
        actor_name=actor_name,
        queue_name=flow.queue_name,
        max_retries=_INFRA_RETRIES,
        retry_when=_retry_on_infrastructure,
        **options,
    )(run)


def _mark_settled(message: Any) -> None:
    """After the commit: the broker must not ack this message again."""
    if isinstance(message, PGMQMessageProxy):
        message.settled = True


def _settle(broker: PGMQBroker, conn: Any, message: Any) -> None:
    """Delete the step's queue message inside the completion transaction (ack with the commit)."""
    if isinstance(message, PGMQMessageProxy):
        broker.delete_in_transaction(conn, message)

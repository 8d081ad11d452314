"""Workflows as Dramatiq actors: one thin actor per step, plus the four orchestration stages.

* Every step of every :class:`~tasker.workflow.definition.Workflow` version becomes an actor
  (:mod:`tasker.runtime.steps`) that hands its delivery to
  :class:`tasker.engine.steps.StepExecutor`, which does the rest.
* The stages run on the orchestration queues: task requests, step (re-)enqueueing, result
  processing (decoupled mode) and finalization (under an atomic claim, applied by
  :class:`~tasker.middleware.finalization.FinalizationClaim`).
* Workers register the templates of the workflows they run when they boot
  (:class:`~tasker.middleware.templates.TemplateRegistrar`).
* With ``sentry``, failed steps are reported to Sentry
  (:class:`~tasker.middleware.sentry.SentryStepFailures`, imported only then).
* Every circuit breaker state change of the process is exported
  (``tasker_circuit_breaker_state``), and an open database breaker holds the worker process's
  readiness back (:func:`report_breaker_states`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import dramatiq
import msgspec
from dramatiq.middleware import CurrentMessage

from tasker.breakers import add_listener, states
from tasker.breakers.database import DATABASE_BREAKER
from tasker.breakers.policy import BreakerPolicy, BreakerState
from tasker.brokers.pgmq import PGMQBroker
from tasker.db.errors import is_transient
from tasker.engine.finalize import DEFAULT_CLAIM_LEASE_S, finalize_task
from tasker.engine.messages import (
    FINALIZE,
    PROCESS_RESULT,
    STEP_ENQUEUE,
    TASK_REQUEST,
    OrchestrationStage,
)
from tasker.engine.results import process_result, reevaluate_task
from tasker.engine.tasks import TaskRequest, create_task
from tasker.exceptions import DatabaseUnavailableError
from tasker.metrics import set_breaker_state
from tasker.middleware.coordinator import InWorkerCoordinator
from tasker.middleware.finalization import FinalizationClaim
from tasker.middleware.metrics import Metrics
from tasker.middleware.registry import WorkerRegistry
from tasker.middleware.templates import TemplateRegistrar
from tasker.readiness import set_process_ready
from tasker.runtime.sender import BrokerSender
from tasker.runtime.sentry import import_sentry_sdk
from tasker.runtime.steps import step_actors, step_executor
from tasker.settings import BreakerSettings, CoordinatorSettings, Settings
from tasker.workflow.definition import Workflow, on_step_declared
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES

__all__ = [
    "DATABASE_BREAKER_READINESS",
    "DATABASE_BREAKER_REASON",
    "BrokerSender",
    "FinalizationClaim",
    "bind_workflow",
    "configure_breakers",
    "install",
    "install_from_settings",
    "report_breaker_states",
    "step_executor",
]

logger = logging.getLogger(__name__)

_MIN_BACKOFF_MS = 500
_MAX_BACKOFF_MS = 30_000
Fn = Callable[..., Any]


def _retry_transient(retries: int, exc: BaseException) -> bool:
    """Stage actors retry database trouble for as long as it lasts (each retry replaces the
    delivery atomically, so nothing is lost meanwhile); anything else is a bug to see in the
    dead-letter queue, never retried blindly."""
    return isinstance(exc, DatabaseUnavailableError) or is_transient(exc)


def install(
    broker: PGMQBroker,
    *,
    inline: bool = True,
    finalization_lease_s: int = DEFAULT_CLAIM_LEASE_S,
    bind_workflows: bool = True,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    allow_template_replace: bool = False,
    coordinator: CoordinatorSettings | None = None,
    breakers: BreakerSettings | None = None,
    sentry: bool = False,
) -> BrokerSender:
    """Declare the orchestration actors on ``broker``; with ``bind_workflows``, every workflow
    step defined in this process, now or later, becomes an actor on it. Step results over
    ``max_payload_bytes`` bytes of JSON fail their step; a workflow version registered with
    another definition stops the worker's boot unless ``allow_template_replace``. Workers keep
    their row in the worker registry; with ``coordinator.in_worker`` each also runs a coordinator
    thread. ``breakers`` configures the step breakers (default: the seed's rule). With
    ``sentry`` (sentry-sdk initialised by :func:`tasker.runtime.sentry.init_sentry`) step
    failures are reported to Sentry. Its :class:`~tasker.middleware.metrics.Metrics` count
    messages, steps and tasks, and the process's breakers report their states
    (:func:`report_breaker_states`)."""
    executor = step_executor(broker)
    executor.max_payload_bytes = max_payload_bytes
    if breakers is not None:
        configure_breakers(broker, breakers)
    report_breaker_states()
    if not any(isinstance(m, CurrentMessage) for m in broker.middleware):
        broker.add_middleware(CurrentMessage())
    metrics = next((m for m in broker.middleware if isinstance(m, Metrics)), None)
    if metrics is None:
        metrics = Metrics()
        broker.add_middleware(metrics)
        executor.observers.append(metrics)
    broker.add_middleware(FinalizationClaim(broker, lease_s=finalization_lease_s))
    broker.add_middleware(TemplateRegistrar(broker, allow_replace=allow_template_replace))
    broker.add_middleware(WorkerRegistry(broker))
    if coordinator is not None and coordinator.in_worker:
        broker.add_middleware(InWorkerCoordinator(broker, coordinator))
    if sentry:
        import_sentry_sdk()  # one line saying how to install it, not an ImportError
        from tasker.middleware.sentry import SentryStepFailures

        broker.add_middleware(SentryStepFailures(broker))
    sender = BrokerSender(broker)
    _declare_stages(broker, sender, metrics)
    if bind_workflows:
        actors = step_actors(broker)
        on_step_declared(lambda flow, step: actors.bind(flow, step, inline=inline))
    return sender


def install_from_settings(
    broker: PGMQBroker, settings: Settings, *, bind_workflows: bool = True
) -> BrokerSender:
    """:func:`install` configured by ``settings``: what every worker does at boot (through
    ``tasker.actors``) and ``tasker queues create``, so both declare the same queues."""
    return install(
        broker,
        inline=settings.engine.result_processing == "inline",
        finalization_lease_s=settings.engine.finalization_claim_lease_s,
        max_payload_bytes=settings.engine.max_payload_bytes,
        allow_template_replace=settings.engine.allow_template_replace,
        bind_workflows=bind_workflows,
        coordinator=settings.coordinator,
        breakers=settings.breakers,
        sentry=bool(settings.sentry.dsn),
    )


def configure_breakers(broker: PGMQBroker, settings: BreakerSettings) -> None:
    """Apply ``[breakers]`` to the step breakers of ``broker``'s steps."""
    default = BreakerPolicy(
        failure_threshold=settings.failure_threshold,
        window_s=settings.window_s,
        open_s=settings.open_s,
        half_open_successes=settings.half_open_successes,
        half_open_trials=settings.half_open_trials,
    )
    shared = step_actors(broker).breakers
    shared.default = default
    shared.overrides = {
        name: replace(
            default,
            **{k: v for k, v in msgspec.structs.asdict(override).items() if v is not None},
        )
        for name, override in settings.overrides.items()
    }
    shared.cache_ttl_s = settings.cache_ttl_s
    shared.max_defer_s = settings.max_defer_s


#: The readiness source (:func:`tasker.readiness.set_process_ready`) of the database breaker.
DATABASE_BREAKER_READINESS = "database_breaker"
#: Why a worker process is not ready while its database breaker is open or half-open.
DATABASE_BREAKER_REASON = "database circuit breaker open: PostgreSQL unreachable"


class _BreakerReports:
    # Reentrant: the subscription exports the states known already under it.
    lock = threading.RLock()
    subscribed = False


def report_breaker_states() -> None:
    """Export the circuit breakers of this process (once per process; :func:`install` calls it).

    Every state change a breaker of this process sees (:func:`tasker.breakers.add_listener`) sets
    ``tasker_circuit_breaker_state{breaker}`` (:func:`tasker.metrics.set_breaker_state`: 0
    closed, 1 open, 2 half-open). While the database breaker is open or half-open the worker
    process holds its readiness back (:func:`tasker.readiness.set_process_ready`, source
    ``database_breaker``), so the pod's ``/health/ready`` answers 503 until PostgreSQL is back.
    The breakers known already are exported at once.
    """
    with _BreakerReports.lock:
        if _BreakerReports.subscribed:
            return
        _BreakerReports.subscribed = True
        add_listener(_breaker_changed)
        for name, state in states().items():
            _breaker_changed(name, state)


def _breaker_changed(name: str, state: str) -> None:
    """Export breaker ``name``'s state as the registry has it now. Changes seen by different
    threads may reach their listeners out of order; exporting the latest state under a lock
    makes the last export right (a database breaker that closed never stays not ready)."""
    with _BreakerReports.lock:
        state = states().get(name, state)
        set_breaker_state(name, state)
        if name != DATABASE_BREAKER:
            return
        if state == BreakerState.CLOSED:
            set_process_ready(True, source=DATABASE_BREAKER_READINESS)
        else:
            # One reason for open and half-open: its probes flip it between the two every
            # open_s, and an unchanged reason rewrites no readiness file.
            set_process_ready(False, DATABASE_BREAKER_REASON, source=DATABASE_BREAKER_READINESS)


def bind_workflow(broker: PGMQBroker, flow: Workflow, *, inline: bool = True) -> None:
    """Make every step of ``flow`` an actor on ``broker`` (``install`` does it automatically)."""
    actors = step_actors(broker)
    for step in flow.steps.values():
        actors.bind(flow, step, inline=inline)


def _declare_stages(broker: PGMQBroker, sender: BrokerSender, metrics: Metrics) -> None:
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

    # Each stage tells the metrics what it did once it committed (the task it created, or the
    # task's new state): in memory, no query.

    @stage(TASK_REQUEST)
    def task_request(request: dict[str, Any]) -> str:
        with broker.pool.connection() as conn:
            handle = create_task(conn, sender, TaskRequest(**request))
        metrics.task_created(handle)
        return handle.task_uuid

    @stage(STEP_ENQUEUE)
    def enqueue_steps(task_uuid: str) -> None:
        with broker.pool.connection() as conn:
            state = reevaluate_task(conn, sender, task_uuid)
        metrics.task_moved(state)

    @stage(PROCESS_RESULT)
    def process_step_result(task_uuid: str, step_uuid: str) -> None:
        with broker.pool.connection() as conn:
            state = process_result(conn, sender, task_uuid, step_uuid)
        metrics.task_moved(state)

    @stage(FINALIZE, finalization_claim=True)
    def finalize(task_uuid: str) -> None:
        with broker.pool.connection() as conn:
            final = finalize_task(conn, task_uuid)
        if final:
            logger.info("Task %s finalized: %s", task_uuid, final)
        metrics.task_moved(final)

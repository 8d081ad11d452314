"""Atomic finalization claims as Dramatiq middleware (seed-spec 4.3)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware, SkipMessage

from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.finalize import (
    DEFAULT_CLAIM_LEASE_S,
    claim_finalization,
    release_finalization,
)
from tasker.engine.messages import FINALIZE
from tasker.metrics import worker_metrics
from tasker.runtime.sender import BrokerSender

__all__ = ["FinalizationClaim"]


class FinalizationClaim(Middleware):
    """Runs actors with ``finalization_claim=True`` only under the task's finalization claim.

    A finalizer that finds the claim held elsewhere skips (counted as contention) and schedules
    one re-check after the lease, in case the holder dies before finishing. ``attempts`` and
    ``contention`` count claim attempts and lost ones in this process, as do the metrics
    ``tasker_finalization_claim_attempts_total{outcome}`` and
    ``tasker_finalization_claim_duration_seconds``.
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
        metrics = worker_metrics()
        with self.pgmq.pool.connection() as conn:
            started = time.perf_counter()
            result = claim_finalization(conn, task_uuid, holder, self.lease_s)
            metrics.finalization_claim_seconds.observe(time.perf_counter() - started)
            outcome = "claimed" if result.claimed else "already_claimed"
            metrics.finalization_claims.labels(outcome).inc()
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

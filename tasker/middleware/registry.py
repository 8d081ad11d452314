"""The worker registry as Dramatiq middleware: each worker process heartbeats a row.

At boot a worker registers (host, pid, queues, the actors it has, threads); every heartbeat of
the broker's lease keeper refreshes ``last_seen`` with the messages it holds and how many it
processed and failed; a clean stop deletes the row. The coordinator reads it for the scaling
hints and to know which handlers live workers have (``tasker workers`` lists it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.registry import deregister_worker, heartbeat_worker, register_worker
from tasker.runtime.steps import existing_step_executor

__all__ = ["WorkerRegistry"]

logger = logging.getLogger(__name__)


class WorkerRegistry(Middleware):
    """Keeps this worker process's row of ``tasker.workers`` (see the module docstring)."""

    def __init__(self, broker: PGMQBroker) -> None:
        self.pgmq = broker
        self.worker_uuid = str(uuid.uuid4())
        self.processed = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._boot: dict[str, Any] | None = None

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        queues = sorted(getattr(worker, "consumer_whitelist", None) or broker.get_declared_queues())
        self._boot = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": queues,
            "actors": sorted(broker.actors),
            "threads": int(getattr(worker, "worker_threads", 1)),
            "version": tasker.__version__,
        }
        self._register()
        self.pgmq.lease_hooks.append(self)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        with self._lock:
            self.processed += 1
            if exception is not None:
                self.failed += 1

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        if self in self.pgmq.lease_hooks:
            self.pgmq.lease_hooks.remove(self)
        try:
            with self.pgmq.pool.connection() as conn:
                deregister_worker(conn, self.worker_uuid)
        except Exception:
            logger.warning("Could not deregister worker %s", self.worker_uuid, exc_info=True)

    # the lease keeper's hook ------------------------------------------------------------------

    def extend(self) -> None:
        """Heartbeat (called with each lease extension)."""
        with self._lock:
            processed, failed = self.processed, self.failed
        executor = existing_step_executor(self.pgmq)
        if executor is not None:  # steps that failed return normally: their executor counts them
            failed += executor.failures_recorded
        in_flight = sum(len(held) for held in self.pgmq.leases.held().values())
        with self.pgmq.pool.connection() as conn:
            alive = heartbeat_worker(
                conn, self.worker_uuid, in_flight=in_flight, processed=processed, failed=failed
            )
        if not alive:  # forgotten after a long outage: come back
            self._register()

    def release(self) -> None:
        """Nothing to give up on a forced exit: the row ages out."""

    def _register(self) -> None:
        assert self._boot is not None
        try:
            with self.pgmq.pool.connection() as conn:
                register_worker(conn, self.worker_uuid, **self._boot)
        except Exception:
            logger.warning("Could not register worker %s", self.worker_uuid, exc_info=True)

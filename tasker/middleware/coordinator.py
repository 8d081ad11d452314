"""Run the coordinator inside a worker process (``coordinator.in_worker = true``).

For one-machine set-ups: every worker process starts a coordinator thread; the advisory lock
makes one of them lead. Production deployments run ``tasker coordinator`` instead.
"""

from __future__ import annotations

import threading
from typing import Any

from dramatiq.broker import Broker
from dramatiq.middleware import Middleware

from tasker.brokers.pgmq import PGMQBroker
from tasker.coordinator.loop import Coordinator
from tasker.settings import CoordinatorSettings

__all__ = ["InWorkerCoordinator"]


class InWorkerCoordinator(Middleware):
    """Starts a :class:`~tasker.coordinator.loop.Coordinator` thread at worker boot and stops it
    at shutdown."""

    def __init__(self, broker: PGMQBroker, settings: CoordinatorSettings) -> None:
        self.coordinator = Coordinator(broker, settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.coordinator.run, args=(self._stop,), name="tasker-coordinator", daemon=True
        )
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

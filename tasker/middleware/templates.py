"""Register the workflow templates of a worker process when it boots."""

from __future__ import annotations

import logging
from typing import Any

from dramatiq.broker import Broker
from dramatiq.middleware import Middleware

from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.templates import register_template
from tasker.workflow.definition import registered_workflows

__all__ = ["TemplateRegistrar"]

logger = logging.getLogger(__name__)


class TemplateRegistrar(Middleware):
    """Stores the template of every workflow defined in this process at worker boot, so clients
    (which need no handler code) can create tasks from them."""

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

"""`/health`, `/health/live` and `/health/ready` of `tasker serve` (no authentication).

* live: the process answers HTTP (Kubernetes restarts it otherwise);
* ready: PostgreSQL answers a `SELECT 1` (503 otherwise: take the pod out of the Service);
* `/health`: ready's answer with the backpressure state (the deepest queue last read, and
  whether `POST /v1/tasks` accepts tasks), the version and the environment.

Each check reports `{status, message, duration_ms}` (seed-spec §9.1).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar import Controller, Response, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tasker import __version__
from tasker.api.context import Api, ApiContext
from tasker.db.queries import load_queries
from tasker.exceptions import TaskerError

__all__ = ["HealthController", "MetricsController"]

logger = logging.getLogger(__name__)


class HealthController(Controller):
    """Probes for Kubernetes, load balancers and people."""

    path = "/health"
    tags = ["health"]

    @get("/live", summary="Liveness", sync_to_thread=False)
    def live(self) -> dict[str, str]:
        """200 while the process serves requests."""
        return {"status": "alive"}

    @get("/ready", summary="Readiness", sync_to_thread=True)
    def ready(self, api: Api) -> Response[dict[str, Any]]:
        """200 when PostgreSQL answers, else 503."""
        database = _database_check(api)
        ok = database["status"] == "ok"
        return Response(
            {"status": "ready" if ok else "not_ready", "checks": {"database": database}},
            status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
        )

    @get("/", summary="Health", sync_to_thread=True)
    def health(self, api: Api) -> Response[dict[str, Any]]:
        """Readiness with the backpressure state, the version and the environment."""
        database = _database_check(api)
        ok = database["status"] == "ok"
        backpressure = api.backpressure
        last = backpressure.last
        queues: dict[str, Any] = {
            "max_queue_depth": backpressure.max_depth,
            "deepest_queue": last.queue if last is not None else None,
            "depth": last.depth if last is not None else None,
            "accepting_tasks": last is None
            or backpressure.max_depth <= 0
            or last.depth <= backpressure.max_depth,
        }
        body = {
            "status": "healthy" if ok else "unhealthy",
            "version": __version__,
            "environment": api.environment,
            "checks": {"database": database, "queues": queues},
        }
        status = HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE
        return Response(body, status_code=status)


def _database_check(api: ApiContext) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with api.client.connection() as conn:
            conn.execute(load_queries("api")["ping"])
    except TaskerError as exc:  # the probe is public: the database's address stays in the log
        logger.warning("Health check: %s", exc)
        status, message = "error", f"PostgreSQL cannot be reached ({type(exc).__name__})"
    else:
        status, message = "ok", "PostgreSQL answers"
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    return {"status": status, "message": message, "duration_ms": duration_ms}


class MetricsController(Controller):
    """``/metrics``: prometheus-client's default registry, where the request metrics of the
    API and the client's ``tasker_tasks_created_total`` live."""

    path = "/metrics"
    tags = ["health"]

    @get("/", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST, sync_to_thread=False)
    def metrics(self) -> Response[bytes]:
        """The process's metrics in Prometheus's text format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

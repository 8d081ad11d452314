"""Build the Litestar application of ``tasker serve``.

:func:`create_app` wires settings to parts: a :class:`tasker.Client` (its pool serves every
request), the :class:`~tasker.api.auth.Authenticator`, the
:class:`~tasker.api.backpressure.Backpressure` check, the endpoints, problem+json errors, the
OpenAPI document at ``/api-docs/openapi.json`` (with a UI at ``/api-docs``) and Prometheus
metrics at ``/metrics``. Handlers are synchronous (psycopg's pool, as workers use it) and run in
``api.threads`` threads.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.plugins.prometheus import PrometheusConfig

from tasker import __version__
from tasker.api.auth import Authenticator
from tasker.api.backpressure import Backpressure
from tasker.api.context import (
    ApiContext,
    api_context,
    checked_request,
    principal,
    require_permission,
)
from tasker.api.health import HealthController, MetricsController
from tasker.api.problems import exception_handlers
from tasker.api.routes_admin import DlqController, TemplatesController
from tasker.api.routes_tasks import TasksController
from tasker.client import Client
from tasker.settings import Settings

__all__ = ["OPENAPI_PATH", "create_app", "openapi_document"]

#: Where the OpenAPI document is served.
OPENAPI_PATH = "/api-docs/openapi.json"

_DESCRIPTION = """\
Start Tasker workflows, follow them, and act on them: cancel a task, retry, resolve or complete
a step by hand, read the audit trail, the templates and the task DLQ.

Authenticate with `X-API-Key: <key>` or `Authorization: Bearer <JWT>` (the API keys and JWT
settings are under `[api.auth]`; authentication is off in development, on in production). Each
endpoint needs one permission (`tasks:create`, `tasks:read`, ...), and a key or token scoped to
namespaces sees only their tasks. Errors are `application/problem+json`.
"""


def create_app(settings: Settings, *, client: Client | None = None) -> Litestar:
    """The API application for ``settings`` (``client``: use this one instead of a new one;
    it is not closed on shutdown then).

    Raises :class:`~tasker.exceptions.ConfigurationError` when authentication is on without a
    key or JWT setting, or its settings are invalid (``tasker serve`` prints it and exits 1).
    """
    api = settings.api
    authenticator = Authenticator(api.auth, settings.env)
    own_client = client is None
    if client is None:
        client = Client(settings=settings)
    context = ApiContext(
        client=client,
        authenticator=authenticator,
        backpressure=Backpressure(
            client,
            namespace=settings.broker.namespace,
            max_depth=api.max_queue_depth,
            check_s=api.backpressure_check_s,
            retry_after_s=api.queue_retry_after_s,
        ),
        settings=api,
        environment=settings.env,
    )
    v1 = Router(
        path="/",
        route_handlers=[TasksController, TemplatesController, DlqController],
        guards=[require_permission],
        before_request=checked_request,
    )

    def _limit_threads() -> None:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = api.threads

    def _close() -> None:
        if own_client:
            client.close()

    return Litestar(
        route_handlers=[v1, HealthController, MetricsController],
        dependencies={
            "api": Provide(api_context, sync_to_thread=False),
            "principal": Provide(principal, sync_to_thread=False),
        },
        exception_handlers=exception_handlers(api.database_retry_after_s),  # type: ignore[arg-type]
        request_max_body_size=api.max_body_bytes,
        openapi_config=_openapi_config(docs_ui=api.docs_ui),
        middleware=[_prometheus().middleware],
        on_startup=[_limit_threads],
        on_shutdown=[_close],
        state=State({"context": context}),
        debug=False,
    )


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, as served at :data:`OPENAPI_PATH` (no database
    is opened: ``tasker api openapi`` and ``tasker api docs`` print it without one)."""
    client = Client(url="postgresql://openapi.invalid/none")  # its pool opens on first use
    try:
        return create_app(Settings(), client=client).openapi_schema.to_schema()
    finally:
        client.close()


def _openapi_config(*, docs_ui: bool) -> OpenAPIConfig:
    plugins: list[Any] = [JsonRenderPlugin(path="/openapi.json")]
    if docs_ui:
        plugins.append(SwaggerRenderPlugin(path="/"))
    return OpenAPIConfig(
        title="Tasker API",
        version=__version__,
        description=_DESCRIPTION,
        path="/api-docs",
        render_plugins=plugins,
        tags=[
            Tag(name="tasks", description="Tasks, their steps, manual step actions, audit"),
            Tag(name="templates", description="Registered workflow templates"),
            Tag(name="dlq", description="The task DLQ: tasks the coordinator gave up"),
            Tag(name="health", description="Probes (no authentication)"),
        ],
        components=Components(
            security_schemes={
                "ApiKey": SecurityScheme(
                    type="apiKey", name="X-API-Key", security_scheme_in="header"
                ),
                "BearerJWT": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
            }
        ),
        use_handler_docstrings=True,
    )


def _prometheus() -> PrometheusConfig:
    """Request metrics (``tasker_api_requests_total``, ``..._request_duration_seconds``,
    ``..._requests_in_progress``, ``..._requests_error_total``) by method, route template and
    status, in prometheus-client's default registry (with the client's
    ``tasker_tasks_created_total``)."""
    return PrometheusConfig(
        app_name="tasker",
        prefix="tasker_api",
        group_path=True,
        exclude=["^/metrics", "^/health", "^/api-docs"],
    )

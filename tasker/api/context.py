"""What every request handler of the API reaches: the client, the caller and the backpressure.

:func:`tasker.api.app.create_app` builds one :class:`ApiContext` per process and keeps it in the
application's state; the permission guard (:func:`require_permission`) authenticates each request
to ``/v1`` and stores its :class:`~tasker.api.auth.Principal` in the request's state, where
handlers read it as their ``principal`` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection, Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE

from tasker.api.auth import Authenticator, Principal
from tasker.api.backpressure import Backpressure
from tasker.client import Client
from tasker.exceptions import TaskNotFoundError, TemplateNotFoundError
from tasker.settings import ApiSettings

__all__ = [
    "PERMISSION_OPT",
    "Api",
    "ApiContext",
    "Caller",
    "api_context",
    "checked_request",
    "needs",
    "principal",
    "require_permission",
    "scope",
    "template_not_found",
    "visible",
]

#: The route handler ``opt`` key naming the permission an endpoint needs.
PERMISSION_OPT = "permission"


@dataclass(frozen=True)
class ApiContext:
    """The process's API parts."""

    client: Client
    authenticator: Authenticator
    backpressure: Backpressure
    settings: ApiSettings
    #: The Tasker environment (``TASKER_ENV``) the process runs in.
    environment: str


#: A handler's ``api`` parameter: the :class:`ApiContext` (a named dependency).
Api = NamedDependency[ApiContext]
#: A handler's ``principal`` parameter: who makes the request (a named dependency).
Caller = NamedDependency[Principal]


def needs(permission: str) -> dict[str, Any]:
    """The route decorator arguments of an endpoint that needs ``permission``: the ``opt`` the
    guard reads, and the OpenAPI security requirement naming it (OpenAPI 3.1 lets a requirement
    of any scheme list roles)."""
    return {
        "opt": {PERMISSION_OPT: permission},
        "security": [{"ApiKey": [permission]}, {"BearerJWT": [permission]}],
    }


def api_context(state: State) -> ApiContext:
    """The dependency ``api``: the application's :class:`ApiContext`."""
    context: ApiContext = state.context
    return context


def principal(request: Request[Any, Any, Any]) -> Principal:
    """The dependency ``principal``: who makes the request (set by :func:`require_permission`)."""
    caller: Principal = request.state.principal
    return caller


async def require_permission(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard of every ``/v1`` endpoint: authenticate the request (``X-API-Key`` or
    ``Authorization: Bearer``) and check the permission in the handler's ``opt``.

    Raises :class:`~tasker.api.auth.AuthenticationError` (401),
    :class:`~tasker.api.auth.PermissionDeniedError` (403) and
    :class:`~tasker.api.auth.AuthUnavailableError` (503: the JWKS cannot be fetched).
    """
    context: ApiContext = connection.app.state.context
    authenticator = context.authenticator
    api_key = connection.headers.get("x-api-key")
    authorization = connection.headers.get("authorization")
    if context.settings.auth.jwt_jwks_url:  # may fetch the keys: not on the event loop
        import anyio.to_thread

        caller = await anyio.to_thread.run_sync(
            lambda: authenticator.authenticate(api_key=api_key, authorization=authorization)
        )
    else:
        caller = authenticator.authenticate(api_key=api_key, authorization=authorization)
    permission = handler.opt.get(PERMISSION_OPT)
    if permission is not None:
        caller.require(permission)
    connection.state.principal = caller


#: The query parameters that may be given more than once (any of several states, all of
#: several tags); any other given twice is refused rather than read as one of its values.
REPEATABLE_PARAMETERS = frozenset({"state", "tag"})


def checked_request(request: Request[Any, Any, Any]) -> None:
    """``before_request`` of ``/v1``: a body must be declared JSON, else 415 (a form or text
    body is what a browser sends cross-origin without asking first); a query parameter given
    twice that takes one value is a 400 naming it (Litestar would keep one value silently)."""
    if request.method in ("POST", "PUT", "PATCH"):
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise HTTPException(
                status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                detail=f"The body must be JSON (Content-Type: application/json), not "
                f"{media_type[:100] or 'undeclared'}.",
            )
    for name, values in request.query_params.dict().items():
        if len(values) > 1 and name not in REPEATABLE_PARAMETERS:
            message = f"given {len(values)} times; give it once"
            raise ValidationException(
                detail=f"{name}: {message}", extra=[{"key": name, "message": message}]
            )


def scope(caller: Principal) -> list[str] | None:
    """The namespaces a listing is limited to (None: every namespace)."""
    return sorted(caller.namespaces) if caller.namespaces is not None else None


def template_not_found(namespace: str, name: str) -> TemplateNotFoundError:
    """The 404 of a template outside the caller's namespaces: the same as for one that does
    not exist."""
    return TemplateNotFoundError(
        f"No template {namespace}/{name} is registered; `GET /v1/templates` lists them."
    )


def visible(caller: Principal, namespace: str, task_uuid: str) -> None:
    """Raise :class:`TaskNotFoundError` (404, as for a task that does not exist) when the task's
    ``namespace`` is outside the caller's namespaces."""
    if not caller.sees(namespace):
        raise TaskNotFoundError(f"No task {task_uuid}; check the id returned by submit().")

"""Every error of the HTTP API as ``application/problem+json`` (RFC 9457).

A problem document carries ``status``, ``title`` (the HTTP reason), ``detail`` (what went wrong
and the fix, the engine's message), ``code`` (a stable machine-readable name such as
``task_not_found``) and, for a request that does not fit its schema, ``errors``: one
``{field, message}`` per bad field (``field`` is a dotted path in the body, or the parameter's
name). Which status an error gets:

=====  ===========================================================================
400    a body, parameter or filter that cannot be used (each names the field)
401    no credentials, or credentials that do not check out (``WWW-Authenticate``)
403    credentials without the permission the endpoint needs
404    no such task, step, template or DLQ entry (or one outside the caller's namespaces)
409    an idempotency key reused with another context; an action the task's state refuses
413    a body over ``api.max_body_bytes``
415    a body that is not declared ``application/json``
503    PostgreSQL unreachable, or queues past ``api.max_queue_depth`` (``Retry-After``)
500    a bug: logged with its traceback, answered without internals
=====  ===========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from tasker.api.auth import AuthenticationError, AuthUnavailableError, PermissionDeniedError
from tasker.exceptions import (
    ActionNotAllowedError,
    DatabaseError,
    DatabaseUnavailableError,
    DlqEntryNotFoundError,
    IdempotencyConflictError,
    StepNotFoundError,
    TaskerError,
    TaskNotFoundError,
    TemplateConflictError,
    TemplateNotFoundError,
)

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "FieldError",
    "Problem",
    "ServiceUnavailableError",
    "exception_handlers",
    "problem_responses",
]

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(msgspec.Struct):
    """One field of a request that does not fit its schema."""

    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An error (RFC 9457): ``detail`` says what went wrong and the fix, ``code`` names it."""

    status: int
    title: str
    detail: str
    code: str
    type: str = "about:blank"
    errors: list[FieldError] = []


class ServiceUnavailableError(TaskerError):
    """The API refuses work for now (backpressure): 503 with ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


#: Parameters whose Python name differs from their name in the request.
FIELD_NAMES = {"states": "state"}

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: Tasker's errors, most specific first: (class, status, code).
_TASKER_ERRORS: tuple[tuple[type[TaskerError], int, str], ...] = (
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "permission_denied"),
    (AuthUnavailableError, 503, "auth_unavailable"),
    (ServiceUnavailableError, 503, "backpressure"),
    (DatabaseUnavailableError, 503, "database_unavailable"),
    (TaskNotFoundError, 404, "task_not_found"),
    (StepNotFoundError, 404, "step_not_found"),
    (TemplateNotFoundError, 404, "template_not_found"),
    (DlqEntryNotFoundError, 404, "dlq_entry_not_found"),
    (IdempotencyConflictError, 409, "idempotency_conflict"),
    (TemplateConflictError, 409, "template_conflict"),
    (ActionNotAllowedError, 409, "action_not_allowed"),
)


def _problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> Response[Problem]:
    body = Problem(
        status=status,
        title=_TITLES.get(status, "Error"),
        detail=detail,
        code=code,
        errors=errors or [],
    )
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _tasker_error(
    database_retry_after_s: int,
) -> Callable[[Request[Any, Any, Any], TaskerError], Response[Problem]]:
    def handle(request: Request[Any, Any, Any], exc: TaskerError) -> Response[Problem]:
        status, code = next(
            ((status, code) for kind, status, code in _TASKER_ERRORS if isinstance(exc, kind)),
            (400, "invalid_request"),
        )
        if status == 400 and isinstance(exc, DatabaseError):  # not the caller's fault
            return _internal(request, exc)
        detail = str(exc)
        if isinstance(exc, DatabaseUnavailableError):  # the URL's host and user stay in the log
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
            detail = (
                "PostgreSQL cannot be reached right now; retry later (the server's log names "
                "the database and the reason)."
            )
        headers = None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="tasker", ApiKey header="X-API-Key"'}
        elif isinstance(exc, ServiceUnavailableError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        elif status == 503:
            headers = {"Retry-After": str(database_retry_after_s)}
        return _problem(status, code, detail, headers=headers)

    return handle


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    """Litestar's own errors: a body or parameter that fails its schema, no such route, a body
    over the limit."""
    if exc.status_code >= HTTP_500_INTERNAL_SERVER_ERROR:
        return _internal(request, exc)
    errors = _field_errors(exc) if isinstance(exc, ValidationException) else []
    detail = str(exc.detail)
    if errors:
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    code = {
        400: "invalid_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
        415: "unsupported_media_type",
    }.get(exc.status_code, "http_error")
    if exc.status_code == 413:
        detail = f"{detail}: the request body is larger than the API accepts (api.max_body_bytes)."
    return _problem(exc.status_code, code, detail, headers=exc.headers, errors=errors)


def _field_errors(exc: ValidationException) -> list[FieldError]:
    """``{field, message}`` from Litestar's validation details (``key``: the body field's
    dotted path, or the parameter's name)."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    found = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        field = str(item.get("key") or "body")
        message = str(item.get("message"))
        if field == "data":  # the body as a whole
            field = "body"
            if message == "'data'":
                message = "a JSON body is required"
        found.append(FieldError(field=FIELD_NAMES.get(field, field), message=message))
    return found


def _too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Problem]:
    """A body nested so deeply that decoding it ran out of stack: the caller's to fix."""
    return _problem(
        400,
        "invalid_request",
        "The body is nested too deeply to read; JSON values may nest 256 levels at most.",
        errors=[FieldError(field="body", message="nested too deeply")],
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    logger.error(
        "%s %s failed",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return _problem(
        500,
        "internal_error",
        "The API failed to answer this request; the server's log has the details.",
    )


def exception_handlers(
    database_retry_after_s: int,
) -> dict[type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Problem]]]:
    """Litestar's ``exception_handlers`` answering every error with a problem document."""
    return {
        TaskerError: _tasker_error(database_retry_after_s),
        HTTPException: _http_error,
        RecursionError: _too_deep,
        Exception: _internal,
    }


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The OpenAPI ``responses`` of an endpoint's errors (each a :class:`Problem`)."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_TITLES.get(status, "Error"),
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for status in statuses
    }

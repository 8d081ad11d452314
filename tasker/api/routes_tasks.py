"""`/v1/tasks`: create, read, list and cancel tasks; their steps, manual actions and audit.

The endpoints of seed-spec §9.1 over :class:`tasker.Client` (same semantics as the Python client
and `tasker task`/`tasker step`). A caller whose key or token is scoped to namespaces gets 404
for a task of any other namespace, as for a task that does not exist.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Response, delete, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from tasker.api.auth import Principal
from tasker.api.context import (
    Api,
    ApiContext,
    Caller,
    needs,
    scope,
    template_not_found,
    visible,
)
from tasker.api.models import (
    ActionResponse,
    AuditEntryResponse,
    CancelResponse,
    CompleteManually,
    ResetForRetry,
    StepAction,
    StepResponse,
    TaskCreate,
    TaskCreated,
    TaskListResponse,
    TaskResponse,
    TaskSummaryResponse,
)
from tasker.api.problems import problem_responses
from tasker.engine.actions import find_step
from tasker.engine.status import TaskStatus
from tasker.exceptions import InvalidFilterError
from tasker.workflow.states import TaskState

__all__ = ["TasksController"]

_READ_ERRORS = problem_responses(400, 401, 403, 404, 503)
#: A free-text filter: equal to the value given at submit.
Text = Annotated[str | None, QueryParameter(description="Equal to the value given at submit.")]
_ACT_ERRORS = problem_responses(400, 401, 403, 404, 409, 503)


class TasksController(Controller):
    """Tasks and their steps."""

    path = "/v1/tasks"
    tags = ["tasks"]

    @post(
        "/",
        **needs("tasks:create"),
        sync_to_thread=True,
        summary="Create a task",
        responses={
            HTTP_200_OK: ResponseSpec(
                data_container=TaskCreated,
                description="The task the idempotency key (or a strict template's context) "
                "already names (created false)",
                generate_examples=False,
            ),
            **problem_responses(400, 401, 403, 404, 409, 413, 415, 503),
        },
        status_code=HTTP_201_CREATED,
    )
    def create_task(
        self, data: JSONBody[TaskCreate], api: Api, principal: Caller
    ) -> Response[TaskCreated]:
        """Start a workflow from its registered template: 201 with the new task, or 200 with the
        task an `idempotency_key` (or a `strict` template's context) already names.

        404: no such template (or its namespace is outside the caller's). 409: the
        idempotency key was used with another context. 503 with `Retry-After`: the queues
        are past `api.max_queue_depth`, or PostgreSQL cannot be reached.
        """
        if not principal.sees(data.namespace):
            raise template_not_found(data.namespace, data.name)
        api.backpressure.check()
        handle = api.client.submit(
            data.namespace,
            data.name,
            data.context,
            version=data.version,
            idempotency_key=data.idempotency_key,
            priority=data.priority,
            correlation_id=_text(data.correlation_id),
            parent_correlation_id=_text(data.parent_correlation_id),
            initiator=data.initiator,
            source_system=data.source_system,
            reason=data.reason,
            tags=data.tags,
        )
        status = HTTP_201_CREATED if handle.created else HTTP_200_OK
        return Response(TaskCreated.of(handle), status_code=status)

    @get(
        "/",
        **needs("tasks:list"),
        sync_to_thread=True,
        summary="List tasks",
        responses=_READ_ERRORS,
    )
    def list_tasks(
        self,
        *,
        api: Api,
        principal: Caller,
        namespace: Annotated[
            str | None, QueryParameter(description="The tasks' namespace.")
        ] = None,
        workflow: Annotated[str | None, QueryParameter(description="The template's name.")] = None,
        version: Annotated[
            str | None, QueryParameter(description="The template's version.")
        ] = None,
        states: Annotated[
            list[TaskState] | None,
            QueryParameter(name="state", description="A task state; repeat for any of several."),
        ] = None,
        since: Annotated[
            datetime | None,
            QueryParameter(description="Requested at or after (ISO 8601, with zone)."),
        ] = None,
        until: Annotated[
            datetime | None, QueryParameter(description="Requested before (ISO 8601, with zone).")
        ] = None,
        initiator: Text = None,
        source_system: Text = None,
        tag: Annotated[
            list[str] | None,
            QueryParameter(
                description="KEY=VALUE the task's tags hold (VALUE read as JSON if it is)."
            ),
        ] = None,
        limit: Annotated[
            int, QueryParameter(ge=1, le=1000, description="Tasks per page, 1 to 1000.")
        ] = 50,
        cursor: Annotated[
            str | None, QueryParameter(description="next_cursor of the previous page.")
        ] = None,
    ) -> TaskListResponse:
        """Tasks matching every filter given, newest first, `limit` at a time (keyset pages:
        pass `next_cursor` as `cursor`, with the same filters)."""
        if namespace is not None and not principal.sees(namespace):
            return TaskListResponse(tasks=[], next_cursor=None)
        page = api.client.list_tasks(
            namespace=namespace,
            workflow=workflow,
            version=version,
            state=states,
            since=since,
            until=until,
            initiator=initiator,
            source_system=source_system,
            tags=_tags(tag),
            limit=limit,
            cursor=cursor,
            namespaces=scope(principal),
        )
        return TaskListResponse(
            tasks=[TaskSummaryResponse.of(task) for task in page.tasks],
            next_cursor=page.next_cursor,
        )

    @get(
        "/{task_uuid:str}",
        **needs("tasks:read"),
        sync_to_thread=True,
        summary="Get a task with its steps",
        responses=_READ_ERRORS,
    )
    def get_task(self, *, task_uuid: FromPath[str], api: Api, principal: Caller) -> TaskResponse:
        """The task's state, context and every step."""
        return TaskResponse.of(_status(api, principal, task_uuid))

    @delete(
        "/{task_uuid:str}",
        **needs("tasks:cancel"),
        sync_to_thread=True,
        summary="Cancel a task",
        responses=_ACT_ERRORS,
        status_code=HTTP_200_OK,
    )
    def cancel_task(
        self,
        *,
        task_uuid: FromPath[str],
        api: Api,
        principal: Caller,
        reason: Annotated[str, QueryParameter(max_length=2000)] = "",
    ) -> CancelResponse:
        """Cancel the task: no step starts after the answer, its queued messages are removed;
        steps running now may finish and are recorded. 409 when the task is final already."""
        _check_visible(api, principal, task_uuid)
        result = api.client.cancel(task_uuid, by=principal.subject, reason=reason)
        return CancelResponse.of(result)

    @get(
        "/{task_uuid:str}/audit",
        **needs("tasks:read"),
        sync_to_thread=True,
        summary="The task's transitions",
        responses=_READ_ERRORS,
    )
    def task_audit(
        self, task_uuid: FromPath[str], api: Api, principal: Caller
    ) -> list[AuditEntryResponse]:
        """The task's state changes, newest first, with who did what and why for an operator's."""
        _check_visible(api, principal, task_uuid)
        return [AuditEntryResponse.of(e) for e in api.client.audit(task_uuid)]

    @get(
        "/{task_uuid:str}/workflow_steps",
        **needs("steps:read"),
        sync_to_thread=True,
        summary="List a task's steps",
        responses=_READ_ERRORS,
    )
    def list_steps(
        self, task_uuid: FromPath[str], api: Api, principal: Caller
    ) -> list[StepResponse]:
        """The task's steps in dependency order."""
        status = _status(api, principal, task_uuid)
        return [StepResponse.of(step) for step in status.steps]

    @get(
        "/{task_uuid:str}/workflow_steps/{step:str}",
        **needs("steps:read"),
        sync_to_thread=True,
        summary="Get a step",
        responses=_READ_ERRORS,
    )
    def get_step(
        self, task_uuid: FromPath[str], step: FromPath[str], api: Api, principal: Caller
    ) -> StepResponse:
        """One step, by name or id."""
        status = _status(api, principal, task_uuid)
        with api.client.connection() as conn:
            step_uuid = find_step(conn, status.task_uuid, step)
        return StepResponse.of(next(s for s in status.steps if s.step_uuid == step_uuid))

    @patch(
        "/{task_uuid:str}/workflow_steps/{step:str}",
        **needs("steps:resolve"),
        sync_to_thread=True,
        summary="Retry, resolve or complete a step by hand",
        responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 503),
    )
    def act_on_step(
        self,
        *,
        task_uuid: FromPath[str],
        step: FromPath[str],
        data: JSONBody[StepAction],
        api: Api,
        principal: Caller,
    ) -> ActionResponse:
        """A manual step action, by `action_type`: `reset_for_retry` (a step in `error`
        runs again with its attempts back to 0), `resolve_manually` (its dependents run
        without its result), `complete_manually` (`completion_data.result` becomes its
        result). A task waiting in `blocked_by_failures` (or given up in `error`) moves on.
        409: the step runs now, or its state or the task's does not allow the action."""
        _check_visible(api, principal, task_uuid)
        client = api.client
        if isinstance(data, ResetForRetry):
            result = client.retry_step(
                task_uuid, step, by=data.reset_by or principal.subject, reason=data.reason
            )
        elif isinstance(data, CompleteManually):
            result = client.complete_step(
                task_uuid,
                step,
                result=data.completion_data.result,
                by=data.completed_by or principal.subject,
                reason=data.reason,
            )
        else:
            result = client.resolve_step(
                task_uuid, step, by=data.resolved_by or principal.subject, reason=data.reason
            )
        return ActionResponse.of(result)

    @get(
        "/{task_uuid:str}/workflow_steps/{step:str}/audit",
        **needs("steps:read"),
        sync_to_thread=True,
        summary="A step's transitions",
        responses=_READ_ERRORS,
    )
    def step_audit(
        self, task_uuid: FromPath[str], step: FromPath[str], api: Api, principal: Caller
    ) -> list[AuditEntryResponse]:
        """The step's state changes, newest first, with who did what and why for an
        operator's."""
        _check_visible(api, principal, task_uuid)
        return [AuditEntryResponse.of(e) for e in api.client.audit(task_uuid, step)]


def _check_visible(api: ApiContext, principal: Principal, task_uuid: str) -> None:
    """404 for a task outside the caller's namespaces; a caller who sees every namespace needs
    no read (the action itself answers 404 for a task that does not exist)."""
    if principal.namespaces is not None:
        _status(api, principal, task_uuid)


def _status(api: ApiContext, principal: Principal, task_uuid: str) -> TaskStatus:
    """The task, if the caller may see it (else 404, as for a task that does not exist)."""
    status = api.client.status(task_uuid)
    visible(principal, status.namespace, status.task_uuid)
    return status


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


def _tags(pairs: list[str] | None) -> dict[str, Any] | None:
    """`KEY=VALUE` pairs as a tags filter; a VALUE that reads as JSON is that JSON value."""
    if not pairs:
        return None
    import json

    tags: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidFilterError(f"tag must be KEY=VALUE, got {pair[:100]!r}.")
        try:
            tags[key] = json.loads(value)
        except ValueError:
            tags[key] = value
    return tags

"""`/v1/templates` and `/v1/dlq`: the registered templates and the task DLQ (seed-spec §9.1).

A caller scoped to namespaces sees the templates and DLQ entries of those namespaces only (404
for another's, as for one that does not exist).
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, patch
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

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
    DlqEntryResponse,
    DlqResolution,
    DlqStatsResponse,
    TemplateResponse,
    TemplateSummaryResponse,
)
from tasker.api.problems import problem_responses
from tasker.engine.staleness import (
    DlqEntry,
    dlq_stats,
    get_dlq_entry,
    list_dlq,
    resolve_dlq_entry,
)
from tasker.exceptions import DlqEntryNotFoundError, TaskNotFoundError

__all__ = ["DlqController", "TemplatesController"]

_READ_ERRORS = problem_responses(400, 401, 403, 404, 503)


class TemplatesController(Controller):
    """The templates workers registered."""

    path = "/v1/templates"
    tags = ["templates"]

    @get(
        "/",
        **needs("templates:read"),
        sync_to_thread=True,
        summary="List templates",
        responses=_READ_ERRORS,
    )
    def list_templates(
        self, api: Api, principal: Caller, namespace: FromQuery[str | None] = None
    ) -> list[TemplateSummaryResponse]:
        """Every registered template version (of `namespace` only, if given)."""
        found = api.client.templates(namespace)
        return [TemplateSummaryResponse.of(t) for t in found if principal.sees(t.namespace)]

    @get(
        "/{namespace:str}/{name:str}",
        **needs("templates:read"),
        sync_to_thread=True,
        summary="Get a template's latest release",
        responses=_READ_ERRORS,
    )
    def get_latest_template(
        self, *, namespace: FromPath[str], name: FromPath[str], api: Api, principal: Caller
    ) -> TemplateResponse:
        """The latest release of a template, with its whole definition."""
        return _template(api, principal, namespace, name, None)

    @get(
        "/{namespace:str}/{name:str}/{version:str}",
        **needs("templates:read"),
        sync_to_thread=True,
        summary="Get a template version",
        responses=_READ_ERRORS,
    )
    def get_template(
        self,
        *,
        namespace: FromPath[str],
        name: FromPath[str],
        version: FromPath[str],
        api: Api,
        principal: Caller,
    ) -> TemplateResponse:
        """One version of a template, with its whole definition."""
        return _template(api, principal, namespace, name, version)


def _template(
    api: ApiContext, principal: Principal, namespace: str, name: str, version: str | None
) -> TemplateResponse:
    if not principal.sees(namespace):
        raise template_not_found(namespace, name)
    return TemplateResponse.of(api.client.template(namespace, name, version))


class DlqController(Controller):
    """The task DLQ: tasks the coordinator gave up, and what operators decided."""

    path = "/v1/dlq"
    tags = ["dlq"]

    @get(
        "/",
        **needs("dlq:read"),
        sync_to_thread=True,
        summary="List DLQ entries",
        responses=_READ_ERRORS,
    )
    def list_entries(
        self,
        *,
        api: Api,
        principal: Caller,
        resolution_status: Annotated[
            str,
            QueryParameter(
                description="pending, manually_resolved, permanently_failed, cancelled or all.",
                pattern="^(pending|manually_resolved|permanently_failed|cancelled|all)$",
            ),
        ] = "pending",
        limit: Annotated[
            int, QueryParameter(ge=1, le=1000, description="Entries per page, 1 to 1000.")
        ] = 50,
    ) -> list[DlqEntryResponse]:
        """DLQ entries, newest first."""
        status = None if resolution_status == "all" else resolution_status
        with api.client.connection() as conn:
            entries = list_dlq(conn, status=status, limit=limit, namespaces=scope(principal))
        return [DlqEntryResponse.of(entry) for entry in entries]

    @get(
        "/stats",
        **needs("dlq:stats"),
        sync_to_thread=True,
        summary="DLQ entries per reason and status",
        responses=_READ_ERRORS,
    )
    def stats(self, *, api: Api, principal: Caller) -> list[DlqStatsResponse]:
        """How many entries have each reason and resolution status."""
        with api.client.connection() as conn:
            found = dlq_stats(conn, namespaces=scope(principal))
        return [DlqStatsResponse.of(group) for group in found]

    @get(
        "/task/{task_uuid:str}",
        **needs("dlq:read"),
        sync_to_thread=True,
        summary="A task's DLQ entries",
        responses=_READ_ERRORS,
    )
    def task_entries(
        self, task_uuid: FromPath[str], api: Api, principal: Caller
    ) -> list[DlqEntryResponse]:
        """Every DLQ entry of the task (a task given up, reopened by an operator and given up
        again has several), newest first; an empty list when it has none (404 for a task of a
        namespace outside the caller's)."""
        if principal.namespaces is not None:
            try:
                status = api.client.status(task_uuid)
            except TaskNotFoundError:
                pass  # deleted by retention: its entries are scoped by their snapshot below
            else:
                visible(principal, status.namespace, status.task_uuid)
        with api.client.connection() as conn:
            entries = list_dlq(
                conn, status=None, limit=1000, task_uuid=task_uuid, namespaces=scope(principal)
            )
        return [DlqEntryResponse.of(entry) for entry in entries]

    @get(
        "/entry/{entry_uuid:str}",
        **needs("dlq:read"),
        sync_to_thread=True,
        summary="Get a DLQ entry",
        responses=_READ_ERRORS,
    )
    def get_entry(
        self, *, entry_uuid: FromPath[str], api: Api, principal: Caller
    ) -> DlqEntryResponse:
        """One entry with the task's snapshot at the time it was given up."""
        with api.client.connection() as conn:
            entry = _visible_entry(get_dlq_entry(conn, entry_uuid), principal)
        return DlqEntryResponse.of(entry)

    @patch(
        "/entry/{entry_uuid:str}",
        **needs("dlq:update"),
        sync_to_thread=True,
        summary="Resolve a DLQ entry",
        responses=problem_responses(400, 401, 403, 404, 413, 415, 503),
    )
    def resolve_entry(
        self,
        *,
        entry_uuid: FromPath[str],
        data: JSONBody[DlqResolution],
        api: Api,
        principal: Caller,
    ) -> DlqEntryResponse:
        """Close a pending entry with a resolution status (404 when it is already closed)."""
        with api.client.connection() as conn:
            _visible_entry(get_dlq_entry(conn, entry_uuid), principal)
            resolve_dlq_entry(
                conn,
                entry_uuid,
                status=data.resolution_status,
                notes=data.resolution_notes,
                by=data.resolved_by or principal.subject,
            )
            entry = get_dlq_entry(conn, entry_uuid)
        return DlqEntryResponse.of(entry)


def _visible_entry(entry: DlqEntry, principal: Principal) -> DlqEntry:
    if principal.sees(entry.namespace or ""):  # an entry without a namespace: unscoped only
        return entry
    raise DlqEntryNotFoundError(f"No task DLQ entry {entry.dlq_entry_uuid}; see `GET /v1/dlq`.")

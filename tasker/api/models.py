"""The HTTP API's request and response bodies (msgspec structs; the OpenAPI schemas come from them).

The API's documents are its own contract: each is built from the engine's records by a
`from_...` function here, so an internal field can change without changing the API. Names
follow the engine and the Python client (`state`, `workflow`), times are ISO 8601 in UTC,
ids are UUID strings. The manual step actions are seed-spec §9.1's `StepManualAction` (tagged
by `action_type`).
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tasker.engine.actions import ActionResult, AuditEntry, CancelResult
from tasker.engine.listing import TaskSummary
from tasker.engine.staleness import DlqEntry, DlqStats
from tasker.engine.status import StepStatus, TaskStatus
from tasker.engine.tasks import TaskHandle
from tasker.engine.templates import Template, TemplateSummary

__all__ = [
    "ActionResponse",
    "AuditEntryResponse",
    "CancelResponse",
    "CompleteManually",
    "CompletionData",
    "DlqEntryResponse",
    "DlqResolution",
    "DlqStatsResponse",
    "ResetForRetry",
    "ResolveManually",
    "StepAction",
    "StepResponse",
    "TaskCreate",
    "TaskCreated",
    "TaskListResponse",
    "TaskResponse",
    "TaskSummaryResponse",
    "TemplateResponse",
    "TemplateSummaryResponse",
]


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass record's fields by name, the values as they are: a response refers to the
    record's values, it does not copy them (``dataclasses.asdict`` deep-copies every result and
    context, 2 ms for a page of 50 tasks)."""
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


Name = Annotated[str, Meta(min_length=1, max_length=255)]
Label = Annotated[str, Meta(max_length=128)]
Reason = Annotated[str, Meta(max_length=2000)]
Who = Annotated[str, Meta(min_length=1, max_length=255)]


class TaskCreate(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/tasks`: start a workflow from a registered template.

    `version` absent: the latest release. `idempotency_key`: a second request with the same
    key (and the same context) returns the first task instead of creating another; with another
    context it is refused (409). `tags`: a JSON object the listing filters on.
    """

    namespace: Name
    name: Name
    context: dict[str, Any] = {}
    version: Name | None = None
    idempotency_key: Name | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    correlation_id: uuid.UUID | None = None
    parent_correlation_id: uuid.UUID | None = None
    initiator: Label | None = None
    source_system: Label | None = None
    reason: Label | None = None
    tags: dict[str, Any] | None = None


class TaskCreated(msgspec.Struct):
    """The task a `POST /v1/tasks` created (201) or found under its identity (200)."""

    task_uuid: str
    namespace: str
    name: str
    version: str
    created: bool

    @classmethod
    def of(cls, handle: TaskHandle) -> TaskCreated:
        """The response for the client's handle."""
        return cls(**_fields(handle))


class StepResponse(msgspec.Struct):
    """One step of a task: its state, attempts, result (None until it completes) and last error.

    `waiting_for` / `waiting_since` say why its message waits (no live worker has the
    handler); `depends_on` names the steps it runs after.
    """

    step_uuid: str
    name: str
    state: str
    attempts: int
    max_attempts: int
    result: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    next_retry_at: datetime | None
    waiting_for: str | None
    waiting_since: datetime | None
    depends_on: list[str]

    @classmethod
    def of(cls, step: StepStatus) -> StepResponse:
        """The response for one step as the engine read it."""
        fields = _fields(step)
        fields["depends_on"] = list(step.depends_on)
        return cls(**fields)


class TaskResponse(msgspec.Struct):
    """A task with every step, in dependency order.

    `settled`: nothing more happens without a person (a final state, or `blocked`: waiting in
    `blocked_by_failures` for a manual step action). `step_counts` counts the steps per state;
    `completion_percentage` is the share of steps complete or resolved, 0 to 100.
    """

    task_uuid: str
    namespace: str
    name: str
    version: str
    state: str
    finished: bool
    blocked: bool
    settled: bool
    priority: int
    context: dict[str, Any]
    correlation_id: str
    initiator: str | None
    source_system: str | None
    reason: str | None
    tags: dict[str, Any]
    requested_at: datetime
    completed_at: datetime | None
    total_steps: int
    step_counts: dict[str, int]
    completion_percentage: float
    steps: list[StepResponse]

    @classmethod
    def of(cls, status: TaskStatus) -> TaskResponse:
        """The response for a task as the engine read it."""
        counts: dict[str, int] = {}
        for step in status.steps:
            counts[step.state] = counts.get(step.state, 0) + 1
        done = counts.get("complete", 0) + counts.get("resolved_manually", 0)
        total = len(status.steps)
        return cls(
            task_uuid=status.task_uuid,
            namespace=status.namespace,
            name=status.name,
            version=status.version,
            state=status.state,
            finished=status.finished,
            blocked=status.blocked,
            settled=status.settled,
            priority=status.priority,
            context=status.context,
            correlation_id=status.correlation_id,
            initiator=status.initiator,
            source_system=status.source_system,
            reason=status.reason,
            tags=status.tags,
            requested_at=status.requested_at,
            completed_at=status.completed_at,
            total_steps=total,
            step_counts=counts,
            completion_percentage=round(100.0 * done / total, 1) if total else 100.0,
            steps=[StepResponse.of(step) for step in status.steps],
        )


class TaskSummaryResponse(msgspec.Struct):
    """One task of a listing (without its steps and context; `GET /v1/tasks/{id}` has them)."""

    task_uuid: str
    namespace: str
    workflow: str
    version: str
    state: str
    priority: int
    initiator: str | None
    source_system: str | None
    reason: str | None
    tags: dict[str, Any]
    correlation_id: str
    requested_at: datetime
    completed_at: datetime | None

    @classmethod
    def of(cls, task: TaskSummary) -> TaskSummaryResponse:
        """The response for one listed task."""
        return cls(**_fields(task))


class TaskListResponse(msgspec.Struct):
    """A page of tasks, newest first; `next_cursor` (None on the last page) is the `cursor`
    of the next request, with the same filters."""

    tasks: list[TaskSummaryResponse]
    next_cursor: str | None


class CancelResponse(msgspec.Struct):
    """A cancelled task: the steps cancelled, the steps still running (they may finish and are
    recorded; the task stays cancelled) and how many queued messages were removed."""

    task_uuid: str
    state: str
    cancelled_steps: list[str]
    running_steps: list[str]
    messages_removed: int

    @classmethod
    def of(cls, result: CancelResult) -> CancelResponse:
        """The response for the engine's cancel result."""
        return cls(
            task_uuid=result.task_uuid,
            state=result.state,
            cancelled_steps=list(result.cancelled_steps),
            running_steps=list(result.running_steps),
            messages_removed=result.messages_removed,
        )


class ResetForRetry(
    msgspec.Struct, forbid_unknown_fields=True, tag_field="action_type", tag="reset_for_retry"
):
    """Run a step in `error` again with its attempts back to 0 (seed-spec §9.1)."""

    reason: Reason = ""
    reset_by: Who | None = None


class ResolveManually(
    msgspec.Struct, forbid_unknown_fields=True, tag_field="action_type", tag="resolve_manually"
):
    """Mark a step `resolved_manually`: its dependents run without its result."""

    reason: Reason = ""
    resolved_by: Who | None = None


class CompletionData(msgspec.Struct, forbid_unknown_fields=True):
    """The result dependents read. `metadata` is accepted as seed-spec's clients send it, and
    not stored: the audit records who completed the step and why (`completed_by`, `reason`)."""

    result: Any
    metadata: dict[str, Any] | None = None


class CompleteManually(
    msgspec.Struct, forbid_unknown_fields=True, tag_field="action_type", tag="complete_manually"
):
    """Mark a step `complete` with `completion_data.result` as its result."""

    completion_data: CompletionData
    reason: Reason = ""
    completed_by: Who | None = None


#: `PATCH /v1/tasks/{task_uuid}/workflow_steps/{step}`: one of the three manual actions.
StepAction = ResetForRetry | ResolveManually | CompleteManually


class ActionResponse(msgspec.Struct):
    """A manual step action done: the step's new state and the task's state after it moved on
    (`reopened`: the task was in `blocked_by_failures` or `error`)."""

    task_uuid: str
    step_uuid: str
    action: str
    step_state: str
    task_state: str
    reopened: bool

    @classmethod
    def of(cls, result: ActionResult) -> ActionResponse:
        """The response for the engine's action result."""
        return cls(**_fields(result))


class AuditEntryResponse(msgspec.Struct):
    """One transition, newest first: `action`, `by` and `reason` for an operator's."""

    transition_uuid: str
    from_state: str | None
    to_state: str
    action: str | None
    by: str | None
    reason: str | None
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditEntryResponse:
        """The response for one audit entry."""
        return cls(
            transition_uuid=entry.transition_uuid,
            from_state=entry.from_state,
            to_state=entry.to_state,
            action=entry.action,
            by=entry.by,
            reason=entry.reason,
            metadata=entry.metadata,
            created_at=entry.created_at,
        )


class TemplateSummaryResponse(msgspec.Struct):
    """One registered template version (`steps`: how many it has)."""

    namespace: str
    name: str
    version: str
    identity_strategy: str
    steps: int
    description: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, template: TemplateSummary) -> TemplateSummaryResponse:
        """The response for one template summary."""
        return cls(**_fields(template))


class TemplateResponse(msgspec.Struct):
    """A registered template with its whole definition (`configuration`: steps, edges,
    retries, timeouts, as the worker registered them)."""

    namespace: str
    name: str
    version: str
    identity_strategy: str
    configuration: dict[str, Any]

    @classmethod
    def of(cls, template: Template) -> TemplateResponse:
        """The response for one template."""
        return cls(
            namespace=template.namespace,
            name=template.name,
            version=template.version,
            identity_strategy=template.identity_strategy,
            configuration=template.configuration,
        )


class DlqEntryResponse(msgspec.Struct):
    """A task the coordinator gave up (stale, or blocked past its limit) and how it was closed;
    `task_snapshot` (the task as it was) only on a single entry."""

    dlq_entry_uuid: str
    task_uuid: str
    namespace: str | None
    task_name: str | None
    original_state: str
    dlq_reason: str
    dlq_timestamp: datetime
    resolution_status: str
    resolution_timestamp: datetime | None
    resolution_notes: str | None
    resolved_by: str | None
    task_snapshot: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def of(cls, entry: DlqEntry) -> DlqEntryResponse:
        """The response for one DLQ entry."""
        fields = _fields(entry)
        fields["dlq_entry_uuid"] = str(entry.dlq_entry_uuid)
        fields["task_uuid"] = str(entry.task_uuid)
        return cls(**fields)


class DlqResolution(msgspec.Struct, forbid_unknown_fields=True):
    """`PATCH /v1/dlq/entry/{id}`: close a pending entry (`resolved_by` absent: the caller)."""

    resolution_status: Annotated[
        str, Meta(pattern="^(manually_resolved|permanently_failed|cancelled)$")
    ]
    resolution_notes: Reason | None = None
    resolved_by: Who | None = None


class DlqStatsResponse(msgspec.Struct):
    """DLQ entries per reason and resolution status, with the oldest and newest entry's time."""

    dlq_reason: str
    resolution_status: str
    entries: int
    oldest: datetime
    newest: datetime

    @classmethod
    def of(cls, stats: DlqStats) -> DlqStatsResponse:
        """The response for one group of entries."""
        return cls(**_fields(stats))

"""Create a task: task row, steps, edges and first transitions, then enqueue its root steps.

Everything happens in one transaction (the caller's, when given), idempotently on the task's
identity hash: a duplicate request returns the existing task and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row

from tasker.engine.enqueue import step_messages
from tasker.engine.messages import Sender
from tasker.engine.sql import q
from tasker.engine.templates import Template, find_template
from tasker.exceptions import IdempotencyConflictError, PayloadError
from tasker.workflow.definition import Workflow
from tasker.workflow.input_schema import validate_input
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES, check_payload, encode_json
from tasker.workflow.states import TaskState, check_task_path

__all__ = ["TaskHandle", "TaskRequest", "create_task", "identity_hash"]


@dataclass(frozen=True)
class TaskRequest:
    """What a client asks for."""

    namespace: str
    name: str
    context: dict[str, Any]
    version: str | None = None
    idempotency_key: str | None = None
    priority: int = 0
    correlation_id: str | None = None
    parent_correlation_id: str | None = None
    initiator: str | None = None
    source_system: str | None = None
    reason: str | None = None
    tags: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskHandle:
    """The created (or already existing) task."""

    task_uuid: str
    namespace: str
    name: str
    version: str
    created: bool


def identity_hash(
    template: Template, context_json: str, idempotency_key: str | None, nonce: str | None = None
) -> str:
    """The task's identity under the template's strategy (seed-spec 1.3; decision 0006).

    * An idempotency key names one task per (namespace, workflow name), whatever the version.
    * ``always_unique`` (the default) tasks are identified by ``nonce`` (a fresh UUID when None):
      a caller that retries a submit whose outcome it could not see passes the same nonce, so the
      retry finds the task the first try created instead of creating a second one.
    * ``strict`` tasks are identified by their context, per template version.
    """
    if idempotency_key is not None:
        material = f"key:{template.namespace}/{template.name}:{idempotency_key}"
    elif template.identity_strategy == "always_unique":
        return f"unique:{nonce or uuid.uuid4()}"
    elif template.identity_strategy == "caller_provided":
        raise PayloadError(
            f"Task template {template.namespace}/{template.name} uses identity_strategy "
            "'caller_provided': pass idempotency_key=..."
        )
    else:
        canonical = json.dumps(json.loads(context_json), sort_keys=True, separators=(",", ":"))
        material = f"strict:{template.named_task_uuid}:{canonical}"
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class _CreatedTask:
    """What ``tasker.create_task_v2`` answered: the task (new, or the one its identity names),
    its template version, and the root steps it enqueued (for a new task)."""

    task_uuid: Any
    version: str
    created: bool
    conflict: bool
    enqueued: list[Any] | None
    enqueued_names: list[str] | None


_CREATED_TASK = class_row(_CreatedTask)

#: The longest idempotency key accepted, in characters.
MAX_KEY_CHARS = 255
#: The largest tags object, in bytes of JSON: tags label a task for listings, which return them
#: with every row; data belongs in the context.
MAX_TAGS_BYTES = 16 * 1024


def _validate(request: TaskRequest, max_bytes: int) -> str:
    """The context as JSON text, once every field of the request passed its check."""
    context: Any = request.context  # typed as a dict, but callers pass anything
    if not isinstance(context, dict):
        kind = type(context).__name__
        raise PayloadError(f"The task context must be a JSON object (a dict), got {kind}.")
    priority = request.priority
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise PayloadError(f"priority must be a whole number from -100 to 100, got {priority!r}.")
    for field in ("namespace", "name", "version"):
        _check_text(field, getattr(request, field), MAX_KEY_CHARS)
    _check_text("idempotency_key", request.idempotency_key, MAX_KEY_CHARS)
    for field in ("correlation_id", "parent_correlation_id"):
        value = getattr(request, field)
        if value is not None:
            try:
                uuid.UUID(str(value))
            except ValueError:
                raise PayloadError(f"{field} must be a UUID, got {value!r}.") from None
    for field in ("initiator", "source_system", "reason"):
        _check_text(field, getattr(request, field), 128)
    if request.tags is not None and not isinstance(request.tags, dict):
        raise PayloadError("tags must be a JSON object (a dict).")
    encode_json(request.tags or {}, "tags", limit=MAX_TAGS_BYTES, setting="a fixed limit of tags")
    return encode_json(request.context, "context", limit=max_bytes)


def _check_text(field: str, value: Any, limit: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise PayloadError(f"{field} must be a string, got {type(value).__name__} {value!r}.")
    if not value or len(value) > limit:
        raise PayloadError(f"{field} must have 1 to {limit} characters, got {len(value)}.")
    check_payload(value, field)


def create_task(
    conn: Any,
    sender: Sender,
    request: TaskRequest,
    *,
    nonce: str | None = None,
    max_context_bytes: int = MAX_PAYLOAD_BYTES,
) -> TaskHandle:
    """Create the task and enqueue its root steps in one transaction on ``conn``.

    One call of ``tasker.create_task_v1`` writes the task, its steps, edges and transitions; the
    root steps' messages are sent in the same transaction. ``nonce``: see :func:`identity_hash`.
    Raises :class:`PayloadError` for a bad request before anything is written.
    """
    context_json = _validate(request, max_context_bytes)
    template = find_template(conn, request.namespace, request.name, request.version)
    flow = _definition(template)
    if flow.input_schema is not None:
        validate_input(flow.input_schema, request.context)
    identity = identity_hash(template, context_json, request.idempotency_key, nonce)
    check_task_path(
        TaskState.PENDING,
        TaskState.INITIALIZING,
        TaskState.ENQUEUING_STEPS,
        TaskState.STEPS_IN_PROCESS,
    )
    steps = list(flow.steps.values())
    edges = [(parent, step.name) for step in steps for parent in step.depends_on]
    params = {
        "named_task_uuid": template.named_task_uuid,
        "context": context_json,
        "identity_hash": identity,
        "priority": request.priority,
        "correlation_id": request.correlation_id or str(uuid.uuid4()),
        "parent_correlation_id": request.parent_correlation_id,
        "initiator": request.initiator,
        "source_system": request.source_system,
        "reason": request.reason,
        "tags": json.dumps(request.tags or {}),
        "steps": [s.name for s in steps],
        "retryable": [s.retryable for s in steps],
        "max_attempts": [s.max_attempts for s in steps],
        "inputs": [json.dumps(dict(s.inputs)) for s in steps],
        "edge_parents": [parent for parent, _ in edges],
        "edge_children": [child for _, child in edges],
    }
    with conn.transaction():
        with conn.cursor(row_factory=_CREATED_TASK) as cursor:
            row: _CreatedTask = cursor.execute(q("create_task"), params).fetchone()
        task_uuid = row.task_uuid
        if row.conflict and request.idempotency_key is not None:
            raise IdempotencyConflictError(
                f"Idempotency key {request.idempotency_key!r} already names task {task_uuid} "
                f"of {flow.namespace}/{flow.name}, submitted with another context. Submit the "
                "same context to get that task back, or use a new key for a new task.",
                task_uuid=str(task_uuid),
            )
        if row.created:
            pairs = list(zip(row.enqueued or (), row.enqueued_names or (), strict=True))
            messages = step_messages(flow.namespace, flow.name, flow.version, task_uuid, pairs)
            sender.send_steps(conn, messages)
    return TaskHandle(str(task_uuid), flow.namespace, flow.name, row.version, bool(row.created))


_DEFINITIONS: dict[Any, tuple[dict[str, Any], Workflow]] = {}


def _definition(template: Template) -> Workflow:
    """The template's workflow, parsed once per template version (checked by equality)."""
    cached = _DEFINITIONS.get(template.named_task_uuid)
    if cached is not None and cached[0] == template.configuration:
        return cached[1]
    flow = Workflow.from_template(template.configuration, resolve_handlers=False, register=False)
    if len(_DEFINITIONS) > 1000:
        _DEFINITIONS.clear()
    _DEFINITIONS[template.named_task_uuid] = (template.configuration, flow)
    return flow

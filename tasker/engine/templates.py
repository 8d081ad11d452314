"""Task templates in the database: workers register theirs, clients create tasks from them.

A template is keyed by (namespace, name, version). Registering a version again with a different
definition (another step, edge, retry or timeout setting: see
:func:`tasker.workflow.shape.definition_shape`) is refused with :class:`TemplateConflictError`:
tasks already created from that version would otherwise run against a definition they were not
created from. Bump the version, or allow replacing while iterating (``allow_replace``, the
``engine.allow_template_replace`` setting, on by default in development only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import q
from tasker.exceptions import (
    PayloadError,
    TaskerError,
    TemplateConflictError,
    TemplateNotFoundError,
    WorkflowDefinitionError,
)
from tasker.workflow.definition import Workflow
from tasker.workflow.payloads import encode_json
from tasker.workflow.shape import definition_shape, shape_differences
from tasker.workflow.versions import version_key

__all__ = [
    "Template",
    "TemplateSummary",
    "find_template",
    "list_templates",
    "register_template",
]

logger = logging.getLogger(__name__)
#: A template is stored as one jsonb value; far below PostgreSQL's limits, far above real ones.
_MAX_TEMPLATE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Template:
    """A registered template as stored."""

    named_task_uuid: Any
    namespace: str
    name: str
    version: str
    configuration: dict[str, Any]
    identity_strategy: str


@dataclass(frozen=True)
class _StoredTemplate:
    """A registered template's row, locked to be compared or replaced."""

    named_task_uuid: Any
    configuration: dict[str, Any]


@dataclass(frozen=True)
class TemplateSummary:
    """One registered template version (``steps``: how many it has)."""

    namespace: str
    name: str
    version: str
    identity_strategy: str
    steps: int
    description: str | None
    created_at: datetime
    updated_at: datetime


_TEMPLATE = class_row(Template)
_STORED_TEMPLATE = class_row(_StoredTemplate)


def register_template(conn: Any, flow: Workflow, *, allow_replace: bool = False) -> Any:
    """Store ``flow``'s template; returns its ``named_task_uuid``.

    Raises :class:`TemplateConflictError` when the same version is stored with a different
    definition, unless ``allow_replace``.
    """
    template = flow.to_template()
    try:
        configuration = encode_json(template, "task template", limit=_MAX_TEMPLATE_BYTES)
    except PayloadError as exc:  # a definition changed after it was checked
        raise WorkflowDefinitionError(f"{flow!r}: {exc}") from None
    params = {
        "name": flow.name,
        "version": flow.version,
        "configuration": configuration,
        "identity": flow.identity_strategy,
    }
    with conn.transaction():
        row = conn.execute(q("upsert_namespace"), {"namespace": flow.namespace}).fetchone()
        params["namespace_uuid"] = row[0]
        inserted = conn.execute(q("insert_named_task"), params).fetchone()
        if inserted is not None:
            return inserted[0]
        with conn.cursor(row_factory=_STORED_TEMPLATE) as cursor:
            stored: _StoredTemplate = cursor.execute(q("lock_named_task"), params).fetchone()
        named_task = stored.named_task_uuid
        differences = _differences(stored.configuration, template)
        if differences and not allow_replace:
            raise TemplateConflictError(
                f"Task template {flow.namespace}/{flow.name} version {flow.version} is already "
                f"registered with a different definition ({differences}). Bump the version "
                "(tasks created from the stored one keep running it), or, while you iterate in "
                "development, allow replacing it: the setting engine.allow_template_replace = "
                "true (TASKER_ENGINE__ALLOW_TEMPLATE_REPLACE) does it for workers and Client(), "
                "Client.register(flow, allow_replace=True) for one call."
            )
        if differences:
            logger.warning(
                "Replacing the stored definition of %s/%s version %s (%s): "
                "engine.allow_template_replace is on; tasks already created keep their steps",
                flow.namespace,
                flow.name,
                flow.version,
                differences,
            )
        conn.execute(q("replace_named_task"), {**params, "named_task": named_task})
    return named_task


def _differences(stored: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two definitions' shapes, in a few words ("" when nothing does)."""
    try:
        old_shape = definition_shape(stored)
    except Exception:  # stored by an older release in a form this one no longer reads
        return "the stored definition cannot be read by this release"
    changes = shape_differences(old_shape, definition_shape(new))
    shown = "; ".join(changes[:5])
    return shown + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")


def find_template(conn: Any, namespace: str, name: str, version: str | None) -> Template:
    """The registered template: ``version``, or the latest release by semantic-version
    precedence (the latest pre-release when no release is registered)."""
    params = {"namespace": namespace, "name": name, "version": version}
    with conn.cursor(row_factory=_TEMPLATE) as cursor:
        rows: list[Template] = cursor.execute(q("template_versions"), params).fetchall()
    if not rows:
        wanted = f"{namespace}/{name}" + (f" version {version}" if version else "")
        raise TemplateNotFoundError(
            f"No task template {wanted} is registered; start a worker that defines it "
            "(workers register their templates at boot) or call Client.register(flow)."
        )
    return max(rows, key=_precedence)


def _precedence(template: Template) -> tuple[int, int, Any]:
    """Releases before pre-releases (``2.0.0-rc.1`` is chosen only when asked for by version, or
    when no release exists), then semantic-version precedence; a version an older release stored
    that is not semver (``"1.0"``) sorts below every semver one."""
    try:
        key = version_key(template.version)
    except TaskerError:
        return (0, 0, str(template.version))
    is_release = key[3][0]
    return (1, is_release, key)


def list_templates(conn: Any, namespace: str | None = None) -> list[TemplateSummary]:
    """Every registered template version (of ``namespace`` only, if given), by namespace and
    name, oldest version first."""
    with conn.cursor(row_factory=class_row(TemplateSummary)) as cursor:
        rows: list[TemplateSummary] = cursor.execute(
            q("list_templates"), {"namespace": namespace}
        ).fetchall()
    return rows

"""Task templates in the database: workers register theirs, clients create tasks from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasker.engine.sql import q
from tasker.exceptions import TemplateNotFoundError
from tasker.workflow.definition import Workflow

__all__ = ["Template", "find_template", "register_template"]


@dataclass(frozen=True)
class Template:
    """A registered template as stored."""

    named_task_uuid: Any
    namespace: str
    name: str
    version: str
    configuration: dict[str, Any]
    identity_strategy: str


def register_template(conn: Any, flow: Workflow) -> Any:
    """Insert or update ``flow``'s template; returns its ``named_task_uuid``."""
    configuration = json.dumps(flow.to_template())
    with conn.transaction():
        row = conn.execute(q("upsert_namespace"), {"namespace": flow.namespace}).fetchone()
        named = conn.execute(
            q("upsert_named_task"),
            {
                "namespace_uuid": row[0],
                "name": flow.name,
                "version": flow.version,
                "configuration": configuration,
                "identity": flow.identity_strategy,
            },
        ).fetchone()
    return named[0]


def find_template(conn: Any, namespace: str, name: str, version: str | None) -> Template:
    """The registered template (latest version when ``version`` is None)."""
    row = conn.execute(
        q("find_template"), {"namespace": namespace, "name": name, "version": version}
    ).fetchone()
    if row is None:
        wanted = f"{namespace}/{name}" + (f" version {version}" if version else "")
        raise TemplateNotFoundError(
            f"No task template {wanted} is registered; start a worker that defines it "
            "(workers register their templates at boot) or call "
            "tasker.engine.templates.register_template()."
        )
    named_task_uuid, found_version, configuration, identity = row
    return Template(named_task_uuid, namespace, name, found_version, configuration, identity)

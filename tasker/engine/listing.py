"""List and search tasks, newest first, a page at a time (for clients, the CLI and the API).

:func:`list_tasks` pages by keyset on ``task_uuid``, never by OFFSET. Task ids are UUID v7, whose
first 48 bits are the creation time in unix milliseconds, so ``ORDER BY task_uuid DESC`` is
newest first and a page's cursor is its last task id: tasks created while a caller pages are
newer than the first page and shift none of the pages after it.

How a query stays cheap on a large table (the indexes are those of migration 0007, each ending in
``task_uuid``):

* The templates a namespace / workflow / version filter names, and the states asked for, become
  one *branch* per template version, state, or pair of both: each branch walks the index of its
  key newest first and PostgreSQL merges the branches, reading each only as far as the page needs.
  ``named_task_uuid = ANY (...)`` would lose the order and sort every matching task. Past
  :data:`MAX_BRANCHES` the templates are one ``= ANY`` filter of each branch instead.
* ``since`` / ``until`` bound ``task_uuid`` as well as ``requested_at``: the UUID v7 bounds of
  those milliseconds, with :data:`UUID_SLACK_MS` to spare, so only that range of an index is
  walked. This relies on ``task_uuid`` being the column default, a UUID v7 made with
  ``requested_at`` by the same clock.
* The statement is never prepared, so it is planned with its values: the planner weighs each one
  against the column statistics (walking the primary key for a common tag, the GIN index for a
  rare one).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from tasker.db.queries import load_queries
from tasker.exceptions import InvalidFilterError
from tasker.workflow.payloads import payload_problem
from tasker.workflow.states import TaskState

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_BRANCHES",
    "MAX_LIMIT",
    "UUID_SLACK_MS",
    "TaskPage",
    "TaskSummary",
    "list_tasks",
]

#: Tasks per page when no ``limit`` is given.
DEFAULT_LIMIT = 50
#: The largest ``limit`` accepted.
MAX_LIMIT = 1000
#: The most branches (template versions x states) one query merges; with more, the template
#: versions are one filter of each state's branch.
MAX_BRANCHES = 32
#: Milliseconds allowed between a task's ``requested_at`` and the time in its ``task_uuid``.
UUID_SLACK_MS = 1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_UNIX_MS = (1 << 48) - 1
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_STATES = ", ".join(TaskState)


@dataclass(frozen=True)
class TaskSummary:
    """One task of a listing: what it runs, where it stands and who asked, without its context
    or steps (:func:`tasker.engine.status.task_status` has those).

    ``workflow`` and ``version`` name the template version; ``state`` is a
    :class:`~tasker.workflow.states.TaskState` value; ``tags`` is the dict given at submit
    (``{}`` when none); times are timezone-aware, ``completed_at`` None until a final state.
    """

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


@dataclass(frozen=True)
class TaskPage:
    """Up to ``limit`` tasks, newest first.

    ``next_cursor`` is an opaque string: pass it as ``cursor`` with the same filters for the
    next page. It is None on the last page.
    """

    tasks: tuple[TaskSummary, ...]
    next_cursor: str | None


def list_tasks(
    conn: Any,
    *,
    namespace: str | None = None,
    workflow: str | None = None,
    version: str | None = None,
    state: str | Iterable[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    initiator: str | None = None,
    source_system: str | None = None,
    tags: Mapping[str, Any] | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    namespaces: Iterable[str] | None = None,
) -> TaskPage:
    """One page of the tasks that match every filter given, newest first.

    * ``namespace``, ``workflow`` (the template name), ``version``: the template versions.
    * ``state``: a :class:`~tasker.workflow.states.TaskState` name, or several (any of them).
    * ``since`` (inclusive) and ``until`` (exclusive): timezone-aware bounds on ``requested_at``.
    * ``initiator``, ``source_system``: equal to the value given at submit.
    * ``tags``: a dict the task's tags contain (``{"env": "prod"}`` matches
      ``{"env": "prod", "team": "a"}``; nested values are matched the same way).
    * ``limit``: tasks per page, 1 to :data:`MAX_LIMIT`; ``cursor``: the ``next_cursor`` of the
      previous page, to continue after it (with the same filters).
    * ``namespaces``: a scope rather than a filter (the namespaces an API caller may see): only
      tasks of these namespaces are listed, whatever the other filters say.

    Runs one or two SELECTs on ``conn``, inside its transaction if one is open. Raises
    :class:`~tasker.exceptions.InvalidFilterError` for an unknown state, a bound that is not a
    timezone-aware datetime, ``since`` not before ``until``, a limit out of range, a malformed
    cursor, tags that are not a dict of JSON values, or a text filter that is not a string.
    """
    size = _limit(limit)
    params = {
        "namespace": _text("namespace", namespace),
        "workflow": _text("workflow", workflow),
        "version": _text("version", version),
        "initiator": _text("initiator", initiator),
        "source_system": _text("source_system", source_system),
        "tags": _tags(tags),
        "limit": size + 1,  # one more than a page: is there a next page?
        **_time_bounds(since, until, cursor),
    }
    states = _states(state)
    scope = None if namespaces is None else [_text("namespaces", n) for n in namespaces]
    params["namespaces"] = scope
    templates = None
    if any(v is not None for v in (namespace, workflow, version, scope)):
        found = conn.execute(_queries()["listing_templates"], params, prepare=False).fetchall()
        templates = tuple(row[0] for row in found)
        if not templates:
            return TaskPage((), None)
    statement, keys = _statement(templates, states)
    with conn.cursor(row_factory=class_row(TaskSummary)) as cur:
        # unprepared: PostgreSQL plans the unnamed statement with the values bound to it
        rows = cur.execute(statement, params | keys, prepare=False).fetchall()
    page = rows[:size]
    next_cursor = _encode_cursor(uuid.UUID(page[-1].task_uuid)) if len(rows) > size else None
    return TaskPage(tuple(page), next_cursor)


def _queries() -> dict[str, str]:
    return load_queries("listing")


_Key = tuple[str, Any] | None  # (a fragment of listing.sql, the value it compares with), or none


def _statement(
    templates: tuple[uuid.UUID, ...] | None, states: tuple[str, ...] | None
) -> tuple[sql.Composed, dict[str, Any]]:
    """The list_tasks statement with a branch per template version x state, and the keys' values.

    Past :data:`MAX_BRANCHES` branches the template versions are one ``= ANY`` key of each branch.
    """
    queries = _queries()
    by_template: list[_Key] = [None]
    if templates is not None and len(templates) * len(states or [None]) > MAX_BRANCHES:
        by_template = [("list_tasks_key_templates", list(templates))]
    elif templates is not None:
        by_template = [("list_tasks_key_template", template) for template in templates]
    by_state: list[_Key] = [None]
    if states is not None:
        by_state = [("list_tasks_key_state", name) for name in states]
    branches = []
    values: dict[str, Any] = {}
    for number, keys in enumerate(itertools.product(by_template, by_state)):
        conditions: list[sql.Composable] = []
        for position, key in enumerate(keys):
            if key is not None:
                fragment, value = key
                name = f"key_{number}_{position}"
                values[name] = value
                conditions.append(sql.SQL(queries[fragment]).format(value=sql.Placeholder(name)))
        where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
        branches.append(sql.SQL(queries["list_tasks_branch"]).format(key=where))
    union = sql.SQL(" UNION ALL ").join(branches)
    return sql.SQL(queries["list_tasks"]).format(branches=union), values


def _text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidFilterError(f"{name} must be a string or None, got {type(value).__name__}.")
    _check_json(name, value)
    return value


def _check_json(name: str, value: Any) -> None:
    """The rule of stored text and JSON (no NUL, no lone surrogate, JSON types only)."""
    problem = payload_problem(value)
    if problem is not None:
        where, message = problem
        raise InvalidFilterError(f"{name}{where}: {message}")


def _states(state: Any) -> tuple[str, ...] | None:
    """The states asked for, each once, in the order given."""
    if state is None:
        return None
    names = [state] if isinstance(state, str) else state
    if not isinstance(names, Iterable) or isinstance(names, bytes | Mapping):
        raise InvalidFilterError(
            f"state must be a task state or several, got {type(state).__name__}; "
            f"the states: {_STATES}."
        )
    checked: dict[str, None] = {}
    for name in names:
        try:
            checked[TaskState(name).value] = None
        except ValueError:
            raise InvalidFilterError(
                f"{name!r} is not a task state; the states: {_STATES}."
            ) from None
    if not checked:
        raise InvalidFilterError(
            f"state is empty, so no task could match; pass some of {_STATES}, or None for all."
        )
    return tuple(checked)


def _limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidFilterError(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}; "
            "page through more with each page's next_cursor."
        )
    return limit


def _tags(tags: Any) -> Jsonb | None:
    if tags is None:
        return None
    if not isinstance(tags, Mapping):
        raise InvalidFilterError(
            f"tags must be a dict of the tags to match, got {type(tags).__name__}."
        )
    wanted = dict(tags)
    _check_json("tags", wanted)
    return Jsonb(wanted) if wanted else None  # {} is contained in every task's tags


def _time_bounds(since: Any, until: Any, cursor: Any) -> dict[str, Any]:
    """``since`` and ``until`` checked, and the task_uuid range they and the cursor leave."""
    start = _moment("since", since)
    end = _moment("until", until)
    if start is not None and end is not None and start >= end:
        raise InvalidFilterError(
            f"since ({start.isoformat()}) must be before until ({end.isoformat()}): since is "
            "inclusive, until exclusive."
        )
    lower = None if start is None else _uuid_at(_unix_ms(start) - UUID_SLACK_MS)
    upper = None if end is None else _uuid_at(_unix_ms(end) + UUID_SLACK_MS + 1)
    if cursor is not None:
        after = _decode_cursor(cursor)
        upper = after if upper is None else min(upper, after)
    return {"since": start, "until": end, "lower": lower, "upper": upper}


def _moment(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidFilterError(f"{name} must be a datetime, got {type(value).__name__}.")
    if value.utcoffset() is None:
        raise InvalidFilterError(
            f"{name} must be timezone-aware, got {value.isoformat()}: give it a tzinfo "
            f"(datetime(..., tzinfo=datetime.UTC)) or use {name}.astimezone() for local time."
        )
    return value


def _unix_ms(moment: datetime) -> int:
    """Whole milliseconds since the epoch, rounded down (integer arithmetic, no float)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _uuid_at(unix_ms: int) -> uuid.UUID | None:
    """The smallest UUID whose first 48 bits (a UUID v7's time) are ``unix_ms`` (0 for earlier
    times); None past the last time a UUID v7 can hold, where the bound would keep every task."""
    if unix_ms > _MAX_UNIX_MS:
        return None
    return uuid.UUID(int=max(unix_ms, 0) << 80)


def _encode_cursor(task_uuid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(task_uuid.bytes).rstrip(b"=").decode("ascii")


def _decode_cursor(cursor: Any) -> uuid.UUID:
    message = (
        f"cursor {cursor!r} is not a cursor a task listing returned: pass a page's next_cursor "
        "unchanged, or None for the first page."
    )
    if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
        raise InvalidFilterError(message)
    try:
        return uuid.UUID(bytes=base64.urlsafe_b64decode(cursor + "=="))
    except (binascii.Error, ValueError):
        raise InvalidFilterError(message) from None

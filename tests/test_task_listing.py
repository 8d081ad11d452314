"""Task listing (tasker.engine.listing): filters, keyset pagination, bad input, and the plans
PostgreSQL chooses for list_tasks over a million tasks."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

import tasker
from tasker.engine import listing
from tasker.engine.listing import TaskPage, TaskSummary, list_tasks
from tasker.exceptions import InvalidFilterError, TaskerError
from tests.history import secondary_task_indexes
from tests.support import InProcessFlows

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def uuid7_at(moment: datetime, *, shift_ms: int = 0) -> uuid.UUID:
    """A UUID v7 of ``moment`` (its millisecond, moved by ``shift_ms``), random bits at random."""
    unix_ms = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1) + shift_ms
    rand_a, rand_b = random.getrandbits(12), random.getrandbits(62)
    return uuid.UUID(int=(unix_ms << 80) | (7 << 76) | (rand_a << 64) | (2 << 62) | rand_b)


def one(conn: psycopg.Connection[Any], query: str, params: Any) -> Any:
    """The first column of the statement's one row."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


@dataclass
class Task:
    """A task row written by the tests, and what list_tasks should say of it."""

    task_uuid: str
    namespace: str
    workflow: str
    version: str
    state: str = "pending"
    initiator: str | None = None
    source_system: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    requested_at: datetime = T0


class Tasks:
    """Templates and task rows written straight to the tables (no steps, no messages)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.rows: list[Task] = []
        self._templates: dict[tuple[str, str, str], uuid.UUID] = {}

    def template(self, namespace: str, workflow: str, version: str) -> uuid.UUID:
        key = (namespace, workflow, version)
        if key not in self._templates:
            space = one(
                self.conn,
                "INSERT INTO tasker.task_namespaces (name) VALUES (%s) ON CONFLICT (name)"
                " DO UPDATE SET name = excluded.name RETURNING task_namespace_uuid",
                (namespace,),
            )
            self._templates[key] = one(
                self.conn,
                "INSERT INTO tasker.named_tasks (task_namespace_uuid, name, version,"
                " configuration) VALUES (%s, %s, %s, '{}')"
                " ON CONFLICT (task_namespace_uuid, name, version)"
                " DO UPDATE SET name = excluded.name RETURNING named_task_uuid",
                (space, workflow, version),
            )
        return self._templates[key]

    def add(
        self,
        namespace: str = "billing",
        workflow: str = "invoice",
        version: str = "1.0.0",
        *,
        at: datetime | None = None,
        shift_ms: int = 0,
        state: str = "pending",
        initiator: str | None = None,
        source_system: str | None = None,
        tags: dict[str, Any] | None = None,
        reason: str | None = None,
        priority: int = 0,
    ) -> Task:
        """A task at ``at`` with a UUID v7 of that time (``shift_ms`` off), else with both made
        by the column defaults, as create_task makes them."""
        task = Task("", namespace, workflow, version, state, initiator, source_system, tags or {})
        row = self.conn.execute(
            "INSERT INTO tasker.tasks (task_uuid, named_task_uuid, state, identity_hash,"
            " correlation_id, initiator, source_system, reason, tags, priority, requested_at,"
            " completed_at)"
            " VALUES (coalesce(%(uuid)s, tasker.uuid_generate_v7()), %(template)s, %(state)s,"
            " gen_random_uuid()::text, gen_random_uuid(), %(initiator)s, %(source_system)s,"
            " %(reason)s, %(tags)s, %(priority)s, coalesce(%(at)s, clock_timestamp()),"
            " CASE WHEN %(state)s IN ('complete', 'error') THEN clock_timestamp() END)"
            " RETURNING task_uuid, requested_at",
            {
                "uuid": None if at is None else uuid7_at(at, shift_ms=shift_ms),
                "template": self.template(namespace, workflow, version),
                "state": state,
                "initiator": initiator,
                "source_system": source_system,
                "reason": reason,
                "tags": Jsonb(task.tags),
                "priority": priority,
                "at": at,
            },
        ).fetchone()
        assert row is not None
        task.task_uuid, task.requested_at = str(row[0]), row[1]
        self.rows.append(task)
        return task

    def newest_first(self, keep: Callable[[Task], bool] = lambda _: True) -> list[str]:
        return [
            t.task_uuid
            for t in sorted(self.rows, key=lambda t: uuid.UUID(t.task_uuid), reverse=True)
            if keep(t)
        ]


@pytest.fixture
def tasks(db: psycopg.Connection[Any]) -> Tasks:
    return Tasks(db)


def every_page(conn: Any, limit: int, **filters: Any) -> list[TaskPage]:
    pages = [list_tasks(conn, limit=limit, **filters)]
    while pages[-1].next_cursor is not None:
        pages.append(list_tasks(conn, limit=limit, cursor=pages[-1].next_cursor, **filters))
        assert len(pages) < 1000
    return pages


def ids(pages: list[TaskPage]) -> list[str]:
    return [task.task_uuid for page in pages for task in page.tasks]


# --- what a listing says of each task ------------------------------------------------------------


def test_a_page_lists_the_newest_tasks_first_with_their_fields(
    db: psycopg.Connection[Any], tasks: Tasks
) -> None:
    first = tasks.add("billing", "invoice", "1.0.0", state="complete", initiator="ana")
    second = tasks.add(
        "shipping",
        "label",
        "2.1.0",
        state="error",
        initiator="bo",
        source_system="crm",
        reason="retry of 41",
        tags={"env": "prod", "team": {"name": "ops"}},
        priority=7,
    )
    page = list_tasks(db)
    assert page.next_cursor is None
    assert [t.task_uuid for t in page.tasks] == [second.task_uuid, first.task_uuid]
    summary = page.tasks[0]
    assert isinstance(summary, TaskSummary)
    correlation = db.execute(
        "SELECT correlation_id, completed_at FROM tasker.tasks WHERE task_uuid = %s",
        (second.task_uuid,),
    ).fetchone()
    assert correlation is not None
    assert summary == TaskSummary(
        task_uuid=second.task_uuid,
        namespace="shipping",
        workflow="label",
        version="2.1.0",
        state="error",
        priority=7,
        initiator="bo",
        source_system="crm",
        reason="retry of 41",
        tags={"env": "prod", "team": {"name": "ops"}},
        correlation_id=str(correlation[0]),
        requested_at=second.requested_at,
        completed_at=correlation[1],
    )
    assert summary.requested_at.tzinfo is not None and summary.completed_at is not None
    assert page.tasks[1].completed_at is not None and page.tasks[1].tags == {}


def test_submitted_tasks_are_listed_with_what_submit_was_given(flows: InProcessFlows) -> None:
    flow = tasker.Workflow("listing", "report", version="1.2.0", register=False)
    flow.step("only")(lambda ctx: None)
    flows.register(flow)
    handle = flows.client.submit(
        "listing", "report", {"n": 1}, initiator="ana", source_system="cron", tags={"env": "qa"}
    )
    flows.client.submit("listing", "report", {"n": 2})
    with psycopg.connect(flows.url, autocommit=True) as conn:
        page = list_tasks(conn, initiator="ana")
        assert [t.task_uuid for t in page.tasks] == [handle.task_uuid]
        (summary,) = page.tasks
        assert (summary.namespace, summary.workflow, summary.version) == (
            "listing",
            "report",
            "1.2.0",
        )
        assert (summary.source_system, summary.tags) == ("cron", {"env": "qa"})
        assert summary.state == flows.client.status(handle.task_uuid).state
        # requested_at and task_uuid come from the column defaults: since/until find it exactly
        at = summary.requested_at
        assert [t.task_uuid for t in list_tasks(conn, since=at, initiator="ana").tasks] == [
            handle.task_uuid
        ]
        assert list_tasks(conn, until=at, initiator="ana").tasks == ()
        one_us = timedelta(microseconds=1)
        assert len(list_tasks(conn, since=at - one_us, until=at + one_us).tasks) == 1
        assert list_tasks(conn, since=at + one_us, initiator="ana").tasks == ()


# --- filters -------------------------------------------------------------------------------------

NAMESPACES = {"billing": ["invoice", "refund"], "shipping": ["label"], "audit": ["scan"]}
STATES = ["pending", "steps_in_process", "complete", "error", "cancelled"]


@pytest.fixture
def many(tasks: Tasks) -> Tasks:
    """83 tasks over 4 namespaces' 8 template versions, 5 states, 3 initiators, 2 sources and
    a few tags, one every 90 s from T0 (several in the same millisecond)."""
    combos = [
        (namespace, workflow, version)
        for namespace, workflows in NAMESPACES.items()
        for workflow in workflows
        for version in ("1.0.0", "2.0.0")
    ]
    for n in range(83):
        namespace, workflow, version = combos[n * 5 % len(combos)]
        tasks.add(
            namespace,
            workflow,
            version,
            at=T0 + timedelta(seconds=90 * (n // 3)),  # three tasks per millisecond
            state=STATES[n * 7 % len(STATES)],
            initiator=[None, "ana", "bo"][n % 3] if n % 11 else "rare",
            source_system=["api", None][n % 2],
            tags={"env": ["prod", "qa"][n % 2], "team": {"name": f"t{n % 4}"}, "n": n},
        )
    return tasks


def since(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


FILTERS: dict[str, tuple[dict[str, Any], Callable[[Task], bool]]] = {
    "none": ({}, lambda t: True),
    "namespace": ({"namespace": "billing"}, lambda t: t.namespace == "billing"),
    "workflow": ({"workflow": "label"}, lambda t: t.workflow == "label"),
    "version": ({"version": "2.0.0"}, lambda t: t.version == "2.0.0"),
    "namespace_workflow_version": (
        {"namespace": "billing", "workflow": "refund", "version": "1.0.0"},
        lambda t: (t.namespace, t.workflow, t.version) == ("billing", "refund", "1.0.0"),
    ),
    "state": ({"state": "error"}, lambda t: t.state == "error"),
    "state_enum": ({"state": tasker.TaskState.COMPLETE}, lambda t: t.state == "complete"),
    "states": (
        {"state": ["cancelled", "pending", "cancelled"]},
        lambda t: t.state in ("cancelled", "pending"),
    ),
    "initiator": ({"initiator": "ana"}, lambda t: t.initiator == "ana"),
    "source_system": ({"source_system": "api"}, lambda t: t.source_system == "api"),
    "tags": ({"tags": {"env": "qa"}}, lambda t: t.tags["env"] == "qa"),
    "tags_nested": (
        {"tags": {"env": "prod", "team": {"name": "t2"}}},
        lambda t: t.tags["env"] == "prod" and t.tags["team"]["name"] == "t2",
    ),
    "tags_empty": ({"tags": {}}, lambda t: True),
    "since": ({"since": since(30)}, lambda t: t.requested_at >= since(30)),
    "until": ({"until": since(30)}, lambda t: t.requested_at < since(30)),
    "since_until": (
        {"since": since(12), "until": since(33)},
        lambda t: since(12) <= t.requested_at < since(33),
    ),
    "namespace_state": (
        {"namespace": "billing", "state": ["complete", "error"]},
        lambda t: t.namespace == "billing" and t.state in ("complete", "error"),
    ),
    "workflow_initiator_tags": (
        {"workflow": "invoice", "initiator": "bo", "tags": {"env": "qa"}},
        lambda t: t.workflow == "invoice" and t.initiator == "bo" and t.tags["env"] == "qa",
    ),
    "everything": (
        {
            "namespace": "billing",
            "state": ["pending", "complete", "error"],
            "since": since(6),
            "until": since(50),
            "source_system": "api",
            "tags": {"env": "prod"},
        },
        lambda t: (
            t.namespace == "billing"
            and t.state in ("pending", "complete", "error")
            and since(6) <= t.requested_at < since(50)
            and t.source_system == "api"
            and t.tags["env"] == "prod"
        ),
    ),
    "no_such_namespace": ({"namespace": "nowhere"}, lambda t: False),
    "no_match": ({"initiator": "nobody"}, lambda t: False),
}


@pytest.mark.parametrize("case", FILTERS)
def test_each_filter_alone_and_combined(
    db: psycopg.Connection[Any], many: Tasks, case: str
) -> None:
    filters, keep = FILTERS[case]
    expected = many.newest_first(keep)
    assert bool(expected) != case.startswith("no_"), "the case should select some tasks"
    assert ids([list_tasks(db, limit=1000, **filters)]) == expected
    pages = every_page(db, 4, **filters)  # also merged across branches, page by page
    assert ids(pages) == expected
    assert all(len(page.tasks) == 4 for page in pages[:-1])


def test_too_many_branches_become_one_filter_with_the_same_tasks(
    db: psycopg.Connection[Any], many: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    filters = {"namespace": "billing", "state": ["pending", "complete", "error"]}
    expected = many.newest_first(
        lambda t: t.namespace == "billing" and t.state in ("pending", "complete", "error")
    )
    monkeypatch.setattr(listing, "MAX_BRANCHES", 2)
    assert ids(every_page(db, 5, **filters)) == expected
    assert ids(every_page(db, 5, namespace="billing")) == many.newest_first(
        lambda t: t.namespace == "billing"
    )


def test_tags_match_by_containment(db: psycopg.Connection[Any], tasks: Tasks) -> None:
    rich = tasks.add(tags={"env": "prod", "team": {"name": "ops", "size": 3}, "ids": [1, 2, 3]})
    tasks.add(tags={"env": "prod"})
    tasks.add(tags={})

    def found(wanted: dict[str, Any]) -> list[str]:
        return [t.task_uuid for t in list_tasks(db, tags=wanted).tasks]

    assert found({"team": {"name": "ops"}}) == [rich.task_uuid]
    assert found({"ids": [3]}) == [rich.task_uuid]
    assert found({"env": "prod", "team": {"size": 3}}) == [rich.task_uuid]
    assert len(found({"env": "prod"})) == 2
    assert found({"env": "prod", "team": {"name": "dev"}}) == []
    assert found({"team": "ops"}) == []


# --- time bounds ---------------------------------------------------------------------------------


def test_since_is_inclusive_and_until_exclusive_to_the_microsecond(
    db: psycopg.Connection[Any], tasks: Tasks
) -> None:
    start, end = T0, T0 + timedelta(hours=1)
    one_us = timedelta(microseconds=1)
    before = tasks.add(at=start - one_us)
    at_start = tasks.add(at=start)
    inside = tasks.add(at=start + timedelta(minutes=30))
    last = tasks.add(at=end - one_us)
    at_end = tasks.add(at=end)
    window = [t.task_uuid for t in list_tasks(db, since=start, until=end).tasks]
    assert window == [last.task_uuid, inside.task_uuid, at_start.task_uuid]
    assert [t.task_uuid for t in list_tasks(db, until=start).tasks] == [before.task_uuid]
    assert [t.task_uuid for t in list_tasks(db, since=end).tasks] == [at_end.task_uuid]
    kolkata = start.astimezone(ZoneInfo("Asia/Kolkata"))  # the same instant, another offset
    assert [t.task_uuid for t in list_tasks(db, since=kolkata, until=end).tasks] == window


@pytest.mark.parametrize("shift_ms", [-1, 1])
def test_time_bounds_allow_a_millisecond_between_task_uuid_and_requested_at(
    db: psycopg.Connection[Any], tasks: Tasks, shift_ms: int
) -> None:
    """The task_uuid bounds derived from since/until have 1 ms of slack: a task whose uuid's
    time is a millisecond off its requested_at is still found at both edges (``end`` within a
    millisecond, the last task in that same millisecond)."""
    start, end = T0, T0 + timedelta(seconds=1, microseconds=500)
    first = tasks.add(at=start, shift_ms=shift_ms)
    last = tasks.add(at=end - timedelta(microseconds=1), shift_ms=shift_ms)
    found = [t.task_uuid for t in list_tasks(db, since=start, until=end).tasks]
    assert found == [last.task_uuid, first.task_uuid]


def test_a_time_range_pages_like_any_filter(db: psycopg.Connection[Any], many: Tasks) -> None:
    keep = lambda t: since(3) <= t.requested_at < since(40)  # noqa: E731
    pages = every_page(db, 2, since=since(3), until=since(40))
    assert ids(pages) == many.newest_first(keep)


# --- pagination ----------------------------------------------------------------------------------


def test_pages_visit_every_task_once_while_new_tasks_arrive(
    db: psycopg.Connection[Any], database_url: str, tasks: Tasks
) -> None:
    for n in range(95):  # up to four tasks in the same millisecond
        tasks.add(at=T0 + timedelta(seconds=n // 4), state=STATES[n % len(STATES)])
    existing = tasks.newest_first()
    seen: list[str] = []
    cursor = None
    with psycopg.connect(database_url, autocommit=True) as other:
        writer = Tasks(other)
        while True:
            page = list_tasks(db, limit=10, cursor=cursor)
            seen += [t.task_uuid for t in page.tasks]
            for _ in range(3):  # newer tasks, by the column defaults, between every two pages
                writer.add()
            if page.next_cursor is None:
                break
            assert len(page.tasks) == 10
            cursor = page.next_cursor
    assert seen == existing
    assert len(set(seen)) == len(seen) == 95
    assert len(list_tasks(db, limit=1000).tasks) == 95 + 3 * 10


def test_the_last_full_page_has_no_cursor(db: psycopg.Connection[Any], tasks: Tasks) -> None:
    for _ in range(6):
        tasks.add()
    page = list_tasks(db, limit=3)
    assert page.next_cursor is not None
    second = list_tasks(db, limit=3, cursor=page.next_cursor)
    assert len(second.tasks) == 3 and second.next_cursor is None
    assert list_tasks(db, limit=6).next_cursor is None
    assert list_tasks(db).tasks and list_tasks(db, state="error") == TaskPage((), None)


# --- bad input -----------------------------------------------------------------------------------

NAIVE = datetime(2025, 3, 1, 12, 0)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "state": ({"state": "done"}, r"'done' is not a task state; the states: pending, initializ"),
    "state_in_list": ({"state": ["error", "failed"]}, r"'failed' is not a task state"),
    "state_empty": ({"state": []}, "state is empty"),
    "state_type": ({"state": 3}, "state must be a task state or several, got int"),
    "since_naive": ({"since": NAIVE}, "since must be timezone-aware, got 2025-03-01T12:00:00"),
    "until_naive": ({"until": NAIVE}, "until must be timezone-aware"),
    "since_text": ({"since": "2025-03-01"}, "since must be a datetime, got str"),
    "since_after_until": (
        {"since": T0, "until": T0 - timedelta(seconds=1)},
        r"since \(2025-03-01T12:00:00\+00:00\) must be before until",
    ),
    "since_is_until": ({"since": T0, "until": T0}, "must be before until"),
    "limit_zero": ({"limit": 0}, "limit must be a whole number from 1 to 1000, got 0"),
    "limit_high": ({"limit": 1001}, "from 1 to 1000, got 1001"),
    "limit_bool": ({"limit": True}, "got True"),
    "limit_text": ({"limit": "10"}, "got '10'"),
    "cursor_garbage": ({"cursor": "not a cursor"}, "is not a cursor a task listing returned"),
    "cursor_uuid": ({"cursor": str(uuid.uuid4())}, "is not a cursor a task listing returned"),
    "cursor_empty": ({"cursor": ""}, "is not a cursor"),
    "cursor_int": ({"cursor": 12}, "is not a cursor"),
    "tags_list": ({"tags": ["env"]}, "tags must be a dict of the tags to match, got list"),
    "tags_set": ({"tags": {"env": {1, 2}}}, r"tags\[.env.\]: .*set"),
    "initiator_int": ({"initiator": 7}, "initiator must be a string or None, got int"),
    "namespace_nul": ({"namespace": "a\x00b"}, "namespace: .*NUL"),
}


@pytest.mark.parametrize("filters,message", BAD.values(), ids=BAD.keys())
def test_bad_input_gets_a_clear_error(
    db: psycopg.Connection[Any], filters: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidFilterError, match=message) as caught:
        list_tasks(db, **filters)
    assert isinstance(caught.value, TaskerError) and isinstance(caught.value, ValueError)


def test_a_cursor_is_opaque_and_round_trips(db: psycopg.Connection[Any], tasks: Tasks) -> None:
    for _ in range(3):
        tasks.add()
    cursor = list_tasks(db, limit=1).next_cursor
    assert cursor is not None and len(cursor) == 22
    with pytest.raises(InvalidFilterError):
        list_tasks(db, cursor=cursor[:-1])
    assert len(list_tasks(db, cursor=cursor).tasks) == 2


# --- plans over a million tasks ------------------------------------------------------------------

# One INSERT of 1,000,000 tasks, one every 2.592 s over 30 days from 2025-01-01 (so each in its
# own millisecond), task_uuid a UUID v7 of requested_at. Attributes come from hashes of the row
# number, so they are independent and the same on every run: 4 namespaces x 3 workflows x 2
# versions (audit: 0.2 % of tasks), states (complete 90 %, error 1 %, resolved_manually 0.05 %),
# 20 initiators plus a rare one (0.1 %), source systems (legacy 0.02 %), and tags with env
# (staging 30 %) and 1,000 customers (0.1 % each).
MILLION = """
INSERT INTO tasker.task_namespaces (name)
SELECT unnest(ARRAY['billing', 'shipping', 'reports', 'audit']);
INSERT INTO tasker.named_tasks (task_namespace_uuid, name, version, configuration)
SELECT ns.task_namespace_uuid, 'flow_' || w, v || '.0.0', '{}'
FROM tasker.task_namespaces ns, generate_series(0, 2) w, generate_series(1, 2) v;

INSERT INTO tasker.tasks (task_uuid, named_task_uuid, state, complete, identity_hash,
    correlation_id, initiator, source_system, tags, requested_at, completed_at)
SELECT
    encode(set_byte(u.b, 6, (get_byte(u.b, 6) & 15) | 112), 'hex')::uuid,
    nt.ids[CASE WHEN h.named % 1000 < 2 THEN 19 + h.named % 6 ELSE 1 + h.named % 18 END],
    s.state, s.state = 'complete', 'bulk:' || g.i, gen_random_uuid(),
    CASE WHEN h.initiator % 1000 = 0 THEN 'auditor' ELSE 'user-' || h.initiator % 20 END,
    CASE WHEN h.source % 5000 = 0 THEN 'legacy' WHEN h.source % 20 = 1 THEN 'import'
         WHEN h.source % 3 = 0 THEN 'cron' ELSE 'api' END,
    jsonb_build_object('env', CASE WHEN h.tags % 10 < 3 THEN 'staging' ELSE 'prod' END,
                       'customer', 'c-' || h.tags / 10 % 1000),
    g.at,
    CASE WHEN s.state IN ('complete', 'error', 'cancelled', 'resolved_manually')
         THEN g.at + interval '1 minute' END
FROM (SELECT array_agg(nt.named_task_uuid ORDER BY ns.name = 'audit', ns.name, nt.name,
                       nt.version) AS ids
      FROM tasker.named_tasks nt JOIN tasker.task_namespaces ns USING (task_namespace_uuid)) nt,
     LATERAL (SELECT i, timestamptz '2025-01-01 00:00:00+00' + i * interval '2592 ms' AS at
              FROM generate_series(0::bigint, 999999) i) g,
     LATERAL (SELECT hashint8extended(g.i, 1) & 2147483647 AS named,
                     hashint8extended(g.i, 2) & 2147483647 AS state,
                     hashint8extended(g.i, 3) & 2147483647 AS initiator,
                     hashint8extended(g.i, 4) & 2147483647 AS source,
                     hashint8extended(g.i, 5) & 2147483647 AS tags) h,
     LATERAL (SELECT CASE WHEN h.state % 10000 < 5 THEN 'resolved_manually'
                          WHEN h.state % 10000 < 105 THEN 'error'
                          WHEN h.state % 10000 < 305 THEN 'cancelled'
                          WHEN h.state % 10000 < 605 THEN 'steps_in_process'
                          WHEN h.state % 10000 < 805 THEN 'waiting_for_retry'
                          WHEN h.state % 10000 < 1005 THEN 'pending'
                          ELSE 'complete' END AS state) s,
     LATERAL (SELECT overlay(uuid_send(gen_random_uuid())
                     PLACING substring(int8send((extract(epoch FROM g.at) * 1000)::bigint) FROM 3)
                     FROM 1 FOR 6) AS b) u
ORDER BY g.i
"""

#: Shared buffers (hit + read) one page of list_tasks may touch; the whole table is ~25,000.
MAX_BUFFERS = 2_000
#: Rows any Sort node of the plan may sort (top-N of a page, or of one rare value's tasks).
MAX_SORTED = 5_000

DAY = datetime(2025, 1, 20, tzinfo=UTC)


@dataclass(frozen=True)
class PlanCase:
    filters: dict[str, Any]
    uses: str | None = None  # an index the plan must use (for a rare value, the only good one)


PLAN_CASES: dict[str, PlanCase] = {
    "no_filter": PlanCase({}),
    "second_page": PlanCase({"cursor": "page 1"}),
    "deep_page": PlanCase({"cursor": "20 days back"}),
    "namespace": PlanCase({"namespace": "billing"}),
    "namespace_rare": PlanCase({"namespace": "audit"}, uses="tasks_named_task_idx"),
    "workflow_version": PlanCase(
        {"namespace": "billing", "workflow": "flow_1", "version": "2.0.0"}
    ),
    "workflow_version_rare": PlanCase(
        {"namespace": "audit", "workflow": "flow_1", "version": "2.0.0"},
        uses="tasks_named_task_idx",
    ),
    "state_error": PlanCase({"state": "error"}),
    "state_complete": PlanCase({"state": "complete"}),
    "state_rare": PlanCase({"state": "resolved_manually"}, uses="tasks_state_idx"),
    "states": PlanCase({"state": ["error", "resolved_manually", "cancelled"]}),
    "initiator": PlanCase({"initiator": "user-3"}),
    "initiator_rare": PlanCase({"initiator": "auditor"}, uses="tasks_initiator_idx"),
    "source_system_rare": PlanCase({"source_system": "legacy"}, uses="tasks_source_system_idx"),
    "tags": PlanCase({"tags": {"env": "staging"}}),
    "tags_rare": PlanCase({"tags": {"customer": "c-42"}}, uses="tasks_tags_idx"),
    "time_range": PlanCase({"since": DAY, "until": DAY + timedelta(days=1)}, uses="tasks_pkey"),
    "time_range_rare_namespace": PlanCase(
        {"namespace": "audit", "since": DAY, "until": DAY + timedelta(days=1)}
    ),
    "namespace_and_state": PlanCase({"namespace": "billing", "state": "error"}),
    "rare_namespace_and_state": PlanCase({"namespace": "audit", "state": ["error", "complete"]}),
}


def _recording(log: list[tuple[Any, Any]]) -> type[psycopg.Cursor[Any]]:
    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            log.append((query, params))
            return super().execute(query, params, **kwargs)

    return Recording


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


@pytest.fixture
def million(server_url: str, database_url: str) -> Iterator[str]:
    """The test's database with a million tasks, the tasks indexes built after the load from
    their definitions (the migrations'), and ANALYZEd."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        indexes = secondary_task_indexes(conn)
        assert {"tasks_named_task_idx", "tasks_tags_idx"} <= {name for name, _ in indexes}
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute(MILLION)
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("ANALYZE tasker.tasks, tasker.named_tasks, tasker.task_namespaces")
    yield database_url


@pytest.mark.slow
def test_listing_plans_over_a_million_tasks_stay_on_the_indexes(million: str) -> None:
    log: list[tuple[Any, Any]] = []
    with psycopg.connect(million, autocommit=True, cursor_factory=_recording(log)) as conn:
        first = list_tasks(conn)
        back = list_tasks(conn, until=datetime(2025, 1, 11, tzinfo=UTC), limit=1)
        cursors = {"page 1": first.next_cursor, "20 days back": back.next_cursor}
        measured = {}
        for name, case in PLAN_CASES.items():
            filters = dict(case.filters)
            if "cursor" in filters:
                filters["cursor"] = cursors[filters["cursor"]]
            log.clear()
            page = list_tasks(conn, **filters)
            assert len(page.tasks) == listing.DEFAULT_LIMIT, name
            statement, params = log[-1]
            (plan,) = (
                conn.execute(
                    sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement,
                    params,
                    prepare=False,
                ).fetchone()
                or ()
            )
            measured[name] = _check_plan(name, plan[0], case)
    print("\nshared buffers per page of list_tasks:", measured)


def _check_plan(name: str, plan: dict[str, Any], case: PlanCase) -> int:
    top = plan["Plan"]
    nodes = list(_nodes(top))
    assert top["Actual Rows"] == listing.DEFAULT_LIMIT + 1, name
    scans = {(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes}
    assert not any(kind == "Seq Scan" and table == "tasks" for kind, table, _ in scans), (
        name,
        scans,
    )
    for node in nodes:
        if node["Node Type"] == "Sort":
            (child,) = node["Plans"]
            sorted_rows = child["Actual Rows"] * child["Actual Loops"]
            assert sorted_rows <= MAX_SORTED, (name, "sorts", sorted_rows)
    if case.uses is not None:
        assert any(index == case.uses for _, _, index in scans), (name, case.uses, scans)
    buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    assert buffers <= MAX_BUFFERS, (name, buffers, scans)
    return int(buffers)

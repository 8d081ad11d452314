"""The step hot path costs the same with 200,000 finished steps in the tables as with none.

Every statement of submit, claim, completion, readiness and finalization finds its rows through
an index scoped to its task or step: while workflows run beside 200,000 finished steps (and
their edges and transitions), no history table is scanned sequentially. That holds too for
workers whose sessions planned the statements while the tables were small and analyzed so: a
plan is kept for the session's life, and the tables grow under it. The statistics collector
counts every scan of every statement, the ones inside the SQL functions included.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.history import HISTORY_TABLES, analyze_history, clone_finished_task, table_scans
from tests.shapes import DIAMOND, LINEAR, Recorder, build_flow
from tests.support import InProcessFlows

HISTORY_STEPS = 200_000

pytestmark = pytest.mark.slow


def _settled_connections(url: str, timeout: float = 30.0) -> None:
    """Wait until this test's other sessions have exited (their statistics are flushed then)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            others = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()[0]
            if others == 0:
                return
            assert time.monotonic() < deadline, f"{others} sessions still open"
            time.sleep(0.05)


def _stop(flows: InProcessFlows, broker: Any) -> None:
    """Stop the worker, the client and the broker: their sessions exit and report statistics."""
    flows.stop()
    flows.client.close()
    broker.close()


def _scans_since(before: dict[str, tuple[int, int]], url: str) -> dict[str, tuple[int, int]]:
    """``{table: (sequential, index scans)}`` of the history tables since ``before``, once every
    other session has exited (so all their statistics are reported)."""
    _settled_connections(url)
    with psycopg.connect(url, autocommit=True) as conn:
        after = table_scans(conn)
    return {
        table: (after[table][0] - before[table][0], after[table][1] - before[table][1])
        for table in HISTORY_TABLES
    }


def _shapes(prefix: str) -> list[Any]:
    """A chain, a diamond and a 1 -> 10 -> 1 fan-out, named ``<prefix>1`` .. ``<prefix>3``."""
    fan = {"start": [], **{f"leaf_{n}": ["start"] for n in range(10)}}
    fan["end"] = [f"leaf_{n}" for n in range(10)]
    recorder = Recorder()
    return [
        build_flow(f"{prefix}{n}", shape, recorder)
        for n, shape in enumerate((LINEAR, DIAMOND, fan), start=1)
    ]


def test_the_hot_path_scans_no_history_table(broker: Any, database_url: str) -> None:
    flows = InProcessFlows(broker, database_url)
    shapes = _shapes("w")
    try:
        model = flows.run(shapes[0])
        assert model.state == "complete"
        with psycopg.connect(database_url, autocommit=True) as conn:
            added = clone_finished_task(conn, model.task_uuid, HISTORY_STEPS // 4)
            assert added == HISTORY_STEPS
            before = table_scans(conn)
        flows.start(*shapes)
        handles = [
            flows.client.submit(flow.namespace, flow.name, {}) for flow in shapes for _ in range(5)
        ]
        for handle in handles:
            assert flows.client.wait(handle.task_uuid, timeout=60).state == "complete"
    finally:
        _stop(flows, broker)
    scans = _scans_since(before, database_url)
    sequential = {table: seq for table, (seq, _) in scans.items() if seq}
    assert not sequential, f"sequential scans while workflows ran: {sequential} ({scans})"
    assert all(idx > 0 for _, idx in scans.values()), scans  # the workload did read them


def test_plans_made_on_small_tables_scan_nothing_as_the_tables_grow(
    broker: Any, database_url: str
) -> None:
    """Statistics taken while the tables were small (a new install, autovacuum off) do not
    turn into sequential scans: Tasker's sessions keep their plans (prepared statements, SQL
    functions) for their life, and the tables grow under them."""
    flows = InProcessFlows(broker, database_url)
    shapes = _shapes("g")
    try:
        flows.register(*shapes)
        model = flows.client.submit(shapes[0].namespace, shapes[0].name, {}).task_uuid
        with psycopg.connect(database_url, autocommit=True) as conn:
            analyze_history(conn)  # one task of four steps: the statistics of small tables
            before = table_scans(conn)
        flows.start(*shapes)
        handles = [
            flows.client.submit(flow.namespace, flow.name, {}) for flow in shapes for _ in range(25)
        ]
        for task in [model, *(handle.task_uuid for handle in handles)]:
            assert flows.client.wait(task, timeout=60).state == "complete"
    finally:
        _stop(flows, broker)
    scans = _scans_since(before, database_url)
    sequential = {table: seq for table, (seq, _) in scans.items() if seq}
    assert not sequential, f"sequential scans of history tables: {sequential}"

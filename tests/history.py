"""Finished history in bulk: copies of a finished task (its steps, edges and transitions).

Used by the hot-path plan test (tests/test_hot_path_plans.py) and the history phase of
bench/workflow_bench.py: the cost of a step must not depend on how many steps were ever recorded.
One SQL statement per table, so 200,000 steps take seconds, not a day of workflows.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clone_finished_task", "secondary_task_indexes", "table_scans"]

#: The tables whose scans the hot path must never make.
HISTORY_TABLES = (
    "tasks",
    "workflow_steps",
    "workflow_step_edges",
    "task_transitions",
    "workflow_step_transitions",
)

_CLONE = """
CREATE TEMP TABLE clone_tasks ON COMMIT DROP AS
SELECT g AS copy, tasker.uuid_generate_v7() AS task_uuid
FROM generate_series(1, %(copies)s) g;

CREATE TEMP TABLE clone_steps ON COMMIT DROP AS
SELECT c.copy, c.task_uuid, s.workflow_step_uuid AS model, gen_random_uuid() AS step_uuid
FROM clone_tasks c CROSS JOIN tasker.workflow_steps s
WHERE s.task_uuid = %(model)s;

INSERT INTO tasker.tasks (task_uuid, named_task_uuid, state, complete, context, identity_hash,
    priority, correlation_id, tags, requested_at, completed_at)
SELECT c.task_uuid, t.named_task_uuid, t.state, t.complete, t.context,
       'history:' || c.task_uuid, t.priority, gen_random_uuid(), t.tags, t.requested_at,
       t.completed_at
FROM clone_tasks c, tasker.tasks t WHERE t.task_uuid = %(model)s;

INSERT INTO tasker.workflow_steps (workflow_step_uuid, task_uuid, named_step_uuid, name, state,
    retryable, max_attempts, attempts, last_attempted_at, inputs, results, started_at,
    finished_at, processed_at)
SELECT m.step_uuid, m.task_uuid, s.named_step_uuid, s.name, s.state, s.retryable,
       s.max_attempts, s.attempts, s.last_attempted_at, s.inputs, s.results, s.started_at,
       s.finished_at, s.processed_at
FROM clone_steps m JOIN tasker.workflow_steps s ON s.workflow_step_uuid = m.model;

INSERT INTO tasker.workflow_step_edges (from_step_uuid, to_step_uuid, name)
SELECT f.step_uuid, t.step_uuid, e.name
FROM tasker.workflow_step_edges e
JOIN clone_steps f ON f.model = e.from_step_uuid
JOIN clone_steps t ON t.model = e.to_step_uuid AND t.copy = f.copy;

INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, metadata, sort_key,
    created_at)
SELECT c.task_uuid, tt.from_state, tt.to_state, tt.metadata, tt.sort_key, tt.created_at
FROM clone_tasks c, tasker.task_transitions tt WHERE tt.task_uuid = %(model)s;

INSERT INTO tasker.workflow_step_transitions (workflow_step_uuid, from_state, to_state,
    metadata, sort_key, created_at)
SELECT m.step_uuid, st.from_state, st.to_state, st.metadata, st.sort_key, st.created_at
FROM clone_steps m
JOIN tasker.workflow_step_transitions st ON st.workflow_step_uuid = m.model;
"""


def clone_finished_task(conn: Any, model: str, copies: int, *, analyze: bool = True) -> int:
    """Insert ``copies`` copies of the finished task ``model`` (new ids, same template), then
    ``ANALYZE`` the tables as autovacuum would (unless ``analyze`` is False: the statistics stay
    those of before); returns how many steps were added. ``conn`` must not be in a transaction
    (autocommit, or idle)."""
    params = {"model": model, "copies": copies}
    with conn.transaction():
        for statement in filter(str.strip, _CLONE.split(";\n")):
            conn.execute(statement, params)
        steps = conn.execute(
            "SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = %s", (model,)
        ).fetchone()[0]
    if analyze:
        analyze_history(conn)
    return int(steps) * copies


def analyze_history(conn: Any) -> None:
    """``ANALYZE`` the history tables (``conn`` not in a transaction)."""
    conn.execute("ANALYZE " + ", ".join(f"tasker.{table}" for table in HISTORY_TABLES))


def table_scans(conn: Any) -> dict[str, tuple[int, int]]:
    """``{table: (sequential scans, index scans)}`` of the history tables, as the statistics
    collector has them (a backend's counts arrive when its transaction ends or it exits)."""
    rows = conn.execute(
        "SELECT relname, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables "
        "WHERE schemaname = 'tasker' AND relname = ANY (%s)",
        (list(HISTORY_TABLES),),
    ).fetchall()
    return {name: (int(seq), int(idx)) for name, seq, idx in rows}


def secondary_task_indexes(conn: Any) -> list[tuple[str, str]]:
    """Drop the indexes of ``tasker.tasks`` that back no constraint and return their
    ``(name, definition)``: a bulk load runs faster without them, and executing each definition
    afterwards builds them again exactly as the migrations made them."""
    from psycopg import sql

    indexes = conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = 'tasker.tasks'::regclass AND NOT EXISTS"
        " (SELECT FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier("tasker", name)))
    return [(str(name), str(definition)) for name, definition in indexes]

"""One vocabulary: the words SQL and Python share are typed once, and these tests keep both sides
equal (procrastinate's ``test_enum_synced``, for CHECK constraints and function answers).

State names are ``TaskState``/``StepState`` and the tables' CHECK constraints; the answers of the
stored functions are the StrEnums of ``tasker.engine.sql_outcomes`` and the functions' source as
installed (``pg_proc.prosrc``). Adding a word on one side only fails here.
"""

from __future__ import annotations

import re
from enum import StrEnum

import psycopg
import pytest

from tasker.db.queries import load_queries
from tasker.engine.sql_outcomes import (
    CancelOutcome,
    ClaimOutcome,
    CompletionOutcome,
    ExecutionStatus,
    ManualAction,
    ManualOutcome,
)
from tasker.workflow.states import StepState, TaskState

Conn = psycopg.Connection[tuple[object, ...]]

_LITERAL = re.compile(r"'([a-z_]+)'")
# A literal the expression yields: selected, assigned, or a CASE branch's value.
_YIELDED = re.compile(r"(?:SELECT|THEN|ELSE|:=)\s+'([a-z_]+)'")
# A literal a state column or variable is compared with or set to.
_STATE_EQ = re.compile(r"state\s*(?:=|<>|!=)\s*'([a-z_]+)'")
_STATE_IN = re.compile(r"state\s+(?:NOT\s+)?IN\s*\(([^)]*)\)")


def _values(enum: type[StrEnum]) -> set[str]:
    return {member.value for member in enum}


def _check_constraint_words(db: Conn, table: str) -> set[str]:
    """The values the CHECK constraint on ``table.state`` allows."""
    rows = db.execute(
        """
        SELECT pg_get_constraintdef(c.oid)
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.conrelid = %s::regclass AND c.contype = 'c' AND a.attname = 'state'
        """,
        (table,),
    ).fetchall()
    assert len(rows) == 1, f"expected one CHECK constraint on {table}.state, found {rows}"
    return set(_LITERAL.findall(str(rows[0][0])))


def _source(db: Conn, function: str) -> str:
    """The installed source of ``tasker.<function>``."""
    row = db.execute(
        """
        SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'tasker' AND p.proname = %s
        """,
        (function,),
    ).fetchone()
    assert row is not None, f"tasker.{function} is not installed"
    return str(row[0])


@pytest.mark.parametrize(
    ("table", "enum"), [("tasker.tasks", TaskState), ("tasker.workflow_steps", StepState)]
)
def test_state_check_constraints_allow_exactly_the_enum_states(
    db: Conn, table: str, enum: type[StrEnum]
) -> None:
    assert _check_constraint_words(db, table) == _values(enum)


# The first column a function returns: its outcome.
_OUTCOME = re.compile(r"RETURN QUERY SELECT\s+'([a-z_]+)'")


def test_cancel_task_answers_are_cancel_outcomes(db: Conn) -> None:
    assert set(_OUTCOME.findall(_source(db, "cancel_task_v1"))) == _values(CancelOutcome)


def test_manual_step_action_answers_are_manual_outcomes(db: Conn) -> None:
    source = _source(db, "manual_step_action_v1")
    assert set(_OUTCOME.findall(source)) == _values(ManualOutcome)
    [accepted] = re.findall(r"p_action NOT IN \(([^)]*)\)", source)
    assert set(_LITERAL.findall(accepted)) == _values(ManualAction)
    assert set(re.findall(r"p_action = '([a-z_]+)'", source)) <= _values(ManualAction)


def test_claim_step_answers_are_claim_outcomes(db: Conn) -> None:
    assert set(_YIELDED.findall(_source(db, "claim_step_v2"))) == _values(ClaimOutcome)


@pytest.mark.parametrize("function", ["complete_step_v2", "complete_step_v3"])
def test_complete_step_answers_are_completion_outcomes(db: Conn, function: str) -> None:
    source = _source(db, function)
    assert set(_YIELDED.findall(source)) == _values(CompletionOutcome)
    # the execution statuses it branches on are those of the execution context
    assert set(re.findall(r"v_status = '([a-z_]+)'", source)) <= _values(ExecutionStatus)


def test_completion_follow_ups_are_the_ones_the_worker_runs(db: Conn) -> None:
    source = _source(db, "enqueue_ready_children_v1")
    assert set(re.findall(r"v_names, '([a-z_]+)'::text", source)) == {"evaluate", "recheck"}
    assert "'evaluate'" in _source(db, "complete_step_v3")


def test_execution_context_statuses_are_execution_statuses(db: Conn) -> None:
    source = _source(db, "task_execution_context_v2")
    status_case = re.search(r"CASE(.*?)END AS status", source, re.DOTALL)
    assert status_case is not None, "task_execution_context_v2 no longer computes its status"
    assert set(_YIELDED.findall(status_case.group(1))) == _values(ExecutionStatus)
    actions = re.search(r"CASE s\.status(.*?)END", source, re.DOTALL)
    assert actions is not None, "task_execution_context_v2 no longer recommends actions"
    assert set(re.findall(r"WHEN '([a-z_]+)'", actions.group(1))) <= _values(ExecutionStatus)


def test_the_sql_compares_states_only_with_state_names(db: Conn) -> None:
    """A misspelt state in a WHERE clause matches nothing instead of failing: every literal a
    ``state`` is compared with, in the engine's statements and in Tasker's functions, is a
    state name."""
    functions = db.execute(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'tasker'"
    ).fetchall()
    queries = [*load_queries("engine").values(), *load_queries("coordinator").values()]
    sources = [str(row[0]) for row in functions] + queries
    words: set[str] = set()
    for source in sources:
        words |= set(_STATE_EQ.findall(source))
        for listed in _STATE_IN.findall(source):
            words |= set(_LITERAL.findall(listed))
    assert words, "no state comparisons found: the patterns above no longer match the SQL"
    states = _values(TaskState) | _values(StepState)
    assert words <= states, f"not state names: {sorted(words - states)}"

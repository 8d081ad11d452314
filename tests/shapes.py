"""Workflow shapes of seed-spec 5.3, as step -> dependencies, and a builder for test flows."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import tasker

LINEAR = {"s1": [], "s2": ["s1"], "s3": ["s2"], "s4": ["s3"]}
DIAMOND = {
    "start": [],
    "branch_b": ["start"],
    "branch_c": ["start"],
    "end": ["branch_b", "branch_c"],
}
TREE = {
    "root": [],
    "left": ["root"],
    "right": ["root"],
    "leaf_d": ["left"],
    "leaf_e": ["left"],
    "leaf_f": ["right"],
    "leaf_g": ["right"],
    "converge": ["leaf_d", "leaf_e", "leaf_f", "leaf_g"],
}
MIXED = {
    "init": [],
    "left": ["init"],
    "right": ["init"],
    "validate": ["left", "right"],
    "transform": ["left"],
    "analyze": ["right"],
    "finalize": ["validate", "transform", "analyze"],
}
ORDER = {
    "validate_order": [],
    "reserve_inventory": ["validate_order"],
    "process_payment": ["validate_order", "reserve_inventory"],
    "ship_order": ["validate_order", "reserve_inventory", "process_payment"],
}
SHAPES = {"linear": LINEAR, "diamond": DIAMOND, "tree": TREE, "mixed": MIXED, "order": ORDER}


class Recorder:
    """Thread-safe log of step executions: (step name, attempt)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[tuple[str, int]] = []

    def add(self, name: str, attempt: int) -> None:
        with self.lock:
            self.runs.append((name, attempt))

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.runs]


def build_flow(
    name: str,
    shape: Mapping[str, list[str]],
    recorder: Recorder,
    *,
    retry_once: frozenset[str] = frozenset(),
    fail_permanently: frozenset[str] = frozenset(),
    backoff: tasker.BackoffPolicy | None = None,
) -> tasker.Workflow:
    """A flow whose steps record themselves and return the sum of their parents plus one."""
    flow = tasker.Workflow(
        "shapes",
        name,
        version="1.0.0",
        register=False,
        backoff=backoff or tasker.BackoffPolicy(base_seconds=0.2, jitter=0),
    )
    for step_name, deps in shape.items():

        def handler(ctx: tasker.StepContext, _name: str = step_name) -> dict[str, Any]:
            recorder.add(_name, ctx.attempt)
            if _name in fail_permanently:
                raise tasker.PermanentError(f"{_name} cannot succeed")
            if _name in retry_once and ctx.attempt == 1:
                raise tasker.RetryableError(f"{_name} is busy")
            direct = [ctx.parent_results[p]["value"] for p in shape[_name]]
            return {"value": sum(direct) + 1}

        flow.add_step(
            tasker.workflow.definition.StepDefinition(
                name=step_name,
                handler_path=f"tests.shapes:{step_name}",
                depends_on=tuple(deps),
                max_attempts=3,
                handler=handler,
            )
        )
    return flow


def expected_values(shape: Mapping[str, list[str]]) -> dict[str, int]:
    values: dict[str, int] = {}
    for name, deps in shape.items():  # shapes are listed in dependency order
        values[name] = sum(values[d] for d in deps) + 1
    return values


def descendants(shape: Mapping[str, list[str]], start: str) -> set[str]:
    found: set[str] = set()
    frontier = {start}
    while frontier:
        frontier = {n for n, deps in shape.items() if frontier & set(deps)} - found
        found |= frontier
    return found


def assert_parents_finished_first(database_url: str, task_uuid: str) -> None:
    """No step of the task started before every parent finished and was marked complete
    (database timestamps)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        early = conn.execute(
            """
            SELECT child.name, parent.name
            FROM tasker.workflow_step_edges e
            JOIN tasker.workflow_steps child ON child.workflow_step_uuid = e.to_step_uuid
            JOIN tasker.workflow_steps parent ON parent.workflow_step_uuid = e.from_step_uuid
            WHERE child.task_uuid = %s
              AND (child.started_at < parent.finished_at
                   OR child.started_at < (SELECT max(t.created_at)
                                          FROM tasker.workflow_step_transitions t
                                          WHERE t.workflow_step_uuid = parent.workflow_step_uuid
                                            AND t.to_state = 'complete'))
            """,
            (task_uuid,),
        ).fetchall()
    assert early == []

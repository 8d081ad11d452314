"""Workflows for the fault tests, run as `tasker worker tests.workers.ledger_flows`.

Every handler run appends to ``fault_exec_log`` (no unique key: duplicate executions are visible)
and writes its effect to ``fault_ledger`` once per step (unique on the step's idempotency key), as
the fault-test protocol prescribes. The handlers' own database writes survive a PostgreSQL restart
(they retry for up to 20 s).

* ``faults/ledger``: ``fan_out -> (a, b, c) -> join``; each step sleeps ``sleep_s`` (task context).
* ``faults/die_once``: ``first -> fragile -> last``; ``fragile`` kills its worker process
  (``os._exit(1)``, or SIGKILL with ``"how": "sigkill"``) on its first attempt.
* ``faults/always_dies``: one step that kills its worker process on every attempt.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg

import tasker

SCHEMA = """
CREATE TABLE IF NOT EXISTS fault_exec_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_uuid uuid NOT NULL, step text NOT NULL, attempt int NOT NULL, pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS fault_ledger (
    key text PRIMARY KEY, task_uuid uuid NOT NULL, step text NOT NULL);
"""


def _execute(statement: str, params: tuple[Any, ...]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(
                os.environ["TASKER_DATABASE__URL"], autocommit=True, connect_timeout=3
            ) as conn:
                conn.execute(statement, params)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _run(ctx: tasker.StepContext) -> dict[str, Any]:
    _execute(
        "INSERT INTO fault_exec_log (task_uuid, step, attempt, pid) VALUES (%s, %s, %s, %s)",
        (ctx.task_uuid, ctx.step_name, ctx.attempt, os.getpid()),
    )
    time.sleep(float(ctx.task_context.get("sleep_s", 0.0)))
    _execute(
        "INSERT INTO fault_ledger (key, task_uuid, step) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (ctx.idempotency_key, ctx.task_uuid, ctx.step_name),
    )
    return {"step": ctx.step_name, "attempt": ctx.attempt}


ledger = tasker.Workflow("faults", "ledger", version="1.0.0")
ledger.step("fan_out", max_attempts=5)(_run)
for _name in ("a", "b", "c"):
    ledger.step(_name, depends_on=["fan_out"], max_attempts=5)(_run)
ledger.step("join", depends_on=["a", "b", "c"], max_attempts=5)(_run)


die_once = tasker.Workflow("faults", "die_once", version="1.0.0")
die_once.step("first")(_run)


@die_once.step(depends_on=["first"], max_attempts=3)
def fragile(ctx: tasker.StepContext) -> dict[str, Any]:
    result = _run(ctx) if ctx.attempt > 1 else None
    if ctx.attempt == 1:
        _execute(
            "INSERT INTO fault_exec_log (task_uuid, step, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.task_uuid, ctx.step_name, ctx.attempt, os.getpid()),
        )
        if ctx.task_context.get("how") == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)
    assert result is not None
    return result


die_once.step("last", depends_on=["fragile"])(_run)


always_dies = tasker.Workflow("faults", "always_dies", version="1.0.0")


@always_dies.step(max_attempts=2)
def doomed(ctx: tasker.StepContext) -> None:
    _execute(
        "INSERT INTO fault_exec_log (task_uuid, step, attempt, pid) VALUES (%s, %s, %s, %s)",
        (ctx.task_uuid, ctx.step_name, ctx.attempt, os.getpid()),
    )
    os._exit(1)


slow_once = tasker.Workflow("faults", "slow_once", version="1.0.0")


@slow_once.step(max_attempts=1)
def patient(ctx: tasker.StepContext) -> dict[str, Any]:
    """Sleeps 30 s the first time it runs for its task, so a test can stop its worker mid-step."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(os.environ["TASKER_DATABASE__URL"], autocommit=True) as conn:
                earlier = conn.execute(
                    "SELECT count(*) FROM fault_exec_log WHERE task_uuid = %s", (ctx.task_uuid,)
                ).fetchone()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    first = earlier is not None and earlier[0] == 0
    result = _run(ctx)
    if first:
        time.sleep(30)
    return result

"""A workflow for crash tests, run as `dramatiq tasker.actors tests.workers.flows`.

``slow`` logs every start to ``test_exec_log`` and takes ``sleep_s`` seconds, so a test can kill
its worker in the middle; ``test_ledger`` records the effect once per step (unique key).
"""

from __future__ import annotations

import time
from typing import Any

import tasker
from tests.workers.actors import _execute

flow = tasker.Workflow("crashy", "slow_chain", version="1.0.0")


@flow.step()
def prepare(ctx: tasker.StepContext) -> dict[str, Any]:
    return {"ready": True}


@flow.step(depends_on=["prepare"], max_attempts=3)
def slow(ctx: tasker.StepContext) -> dict[str, Any]:
    _execute(
        "INSERT INTO test_exec_log (kind, key, pid, read_ct) VALUES ('start', %s, pg_backend_pid(),"
        " %s)",
        (ctx.step_uuid, ctx.attempt),
    )
    time.sleep(float(ctx.task_context.get("sleep_s", 0)))
    _execute(
        "INSERT INTO test_ledger (key, pid) VALUES (%s, 0) ON CONFLICT DO NOTHING",
        (ctx.idempotency_key,),
    )
    return {"attempt": ctx.attempt}


@flow.step(depends_on=["slow"])
def finish(ctx: tasker.StepContext) -> dict[str, Any]:
    return {"slow_attempt": ctx.parent_results["slow"]["attempt"]}

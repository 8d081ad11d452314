"""Tasker workflows of the workflow benchmark, run by
``python -m dramatiq tasker.actors bench._bench_flows``.

One workflow per workload of ``bench/_bench_ledger.py``, in the namespace ``wfbench``:
``w1_chain``, ``w2_diamond``, ``w3_fanout``, and the wide and long shapes ``w4_wide``
(1 -> 1,000 -> 1) and ``w5_long`` (a chain of 200). Every step runs the same no-op handler. It
returns ``None`` and appends one line to the ledger file when ``BENCH_LEDGER`` is set. The driver's
headline handoff numbers come from ``tasker.workflow_steps``; the ledger gives the same numbers
at the handler's edges, measured the same way as for the peers.
"""

from __future__ import annotations

import tasker
from bench._bench_ledger import WORKLOADS, Workload, noop_step
from tasker.workflow.definition import StepDefinition

NAMESPACE = "wfbench"
VERSION = "1.0.0"
WORKFLOW_NAMES = {
    "w1": "w1_chain",
    "w2": "w2_diamond",
    "w3": "w3_fanout",
    "w4": "w4_wide",
    "w5": "w5_long",
}


def bench_noop(ctx: tasker.StepContext) -> None:
    """No work: one ledger line."""
    noop_step(ctx.task_uuid, ctx.step_name)


def _build(workload: Workload) -> tasker.Workflow:
    flow = tasker.Workflow(
        NAMESPACE,
        WORKFLOW_NAMES[workload.key],
        version=VERSION,
        description=f"benchmark: {workload.title}",
        identity_strategy="always_unique",
    )
    for name, parents in workload.parents.items():
        flow.add_step(
            StepDefinition(
                name=name,
                handler_path=f"{__name__}:bench_noop",
                depends_on=parents,
                handler=bench_noop,
            )
        )
    return flow


FLOWS = {key: _build(workload) for key, workload in WORKLOADS.items()}

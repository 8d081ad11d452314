"""End-to-end workflows with an in-process Dramatiq worker and real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.workflows import bind_workflow, install


@pytest.fixture
def engine(broker: PGMQBroker) -> Iterator[tasker.Client]:
    install(broker, bind_workflows=False, finalization_lease_s=5)
    client = tasker.Client(broker=broker)
    yield client


def start(
    broker: PGMQBroker, client: tasker.Client, flow: tasker.Workflow, *, inline: bool = True
) -> dramatiq.Worker:
    bind_workflow(broker, flow, inline=inline)
    client.register(flow)
    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=4)
    worker.start()
    return worker


def linear_flow() -> tasker.Workflow:
    flow = tasker.Workflow("demo_ns", "linear", version="1.0.0", register=False)

    @flow.step()
    def first(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"value": ctx.task_context["n"] * 2}

    @flow.step(depends_on=["first"])
    def second(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"value": ctx.parent_results["first"]["value"] + 1}

    @flow.step(depends_on=["second"])
    def third(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"sum": ctx.parent_results["first"]["value"] + ctx.parent_results["second"]["value"]}

    return flow


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "decoupled"])
def test_linear_workflow_completes(broker: PGMQBroker, engine: tasker.Client, inline: bool) -> None:
    flow = linear_flow()
    worker = start(broker, engine, flow, inline=inline)
    try:
        handle = engine.submit("demo_ns", "linear", {"n": 5})
        status = engine.wait(handle.task_uuid, timeout=20)
    finally:
        worker.stop()
    assert status.state == "complete", status
    assert status.step("third").result == {"sum": 21}
    assert [s.state for s in status.steps] == ["complete"] * 3
    assert all(s.attempts == 1 for s in status.steps)

"""Property: random DAGs of up to 30 steps always complete, and no step ever starts before all
of its parents completed (checked on database timestamps)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import dramatiq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.workflows import bind_workflow, install
from tests.shapes import Recorder, assert_parents_finished_first, build_flow, expected_values

_names = itertools.count()


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    size = draw(st.integers(min_value=1, max_value=30))
    shape: dict[str, list[str]] = {}
    for i in range(size):
        earlier = list(shape)
        parents = (
            draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        )
        shape[f"s{i}"] = parents
    return shape


@pytest.fixture
def running(broker: PGMQBroker) -> Iterator[tuple[PGMQBroker, tasker.Client]]:
    install(broker, bind_workflows=False, finalization_lease_s=5)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    worker.start()
    yield broker, tasker.Client(broker=broker)
    worker.stop()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(shape=dags())
def test_random_dags_complete_in_dependency_order(
    running: tuple[PGMQBroker, tasker.Client], database_url: str, shape: dict[str, list[str]]
) -> None:
    broker, client = running
    recorder = Recorder()
    flow = build_flow(f"random_{next(_names)}", shape, recorder)
    bind_workflow(broker, flow)
    client.register(flow)
    handle = client.submit(flow.namespace, flow.name, {})
    status = client.wait(handle.task_uuid, timeout=60)
    assert status.state == "complete"
    assert {s.name: s.result["value"] for s in status.steps} == expected_values(shape)
    assert sorted(recorder.names()) == sorted(shape)
    assert_parents_finished_first(database_url, handle.task_uuid)

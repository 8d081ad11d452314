"""The engine's guarantees: idempotent and transactional submits, exactly-once finalization,
joins that never lose a sibling, duplicate deliveries recorded once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
import psycopg
import pytest

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.finalize import claim_finalization, finalize_task, release_finalization
from tasker.runtime.workflows import BrokerSender, bind_workflow, install
from tests.shapes import DIAMOND, LINEAR, Recorder, build_flow


@pytest.fixture
def client(broker: PGMQBroker) -> Iterator[tasker.Client]:
    install(broker, bind_workflows=False, finalization_lease_s=5)
    yield tasker.Client(broker=broker)


def register(broker: PGMQBroker, client: tasker.Client, flow: tasker.Workflow) -> None:
    bind_workflow(broker, flow)
    client.register(flow)


@pytest.fixture
def worker(broker: PGMQBroker, client: tasker.Client) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    yield worker
    worker.stop()


def count(url: str, query: str, *params: Any) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def test_submit_is_idempotent_with_a_key_or_a_strict_template(
    broker: PGMQBroker, client: tasker.Client, database_url: str
) -> None:
    flow = build_flow("idem", LINEAR, Recorder())
    flow.identity_strategy = "strict"  # one task per context (the default: one per submit)
    register(broker, client, flow)
    first = client.submit("shapes", "idem", {"order": 1})
    again = client.submit("shapes", "idem", {"order": 1})
    keyed = client.submit("shapes", "idem", {"order": 2}, idempotency_key="abc")
    keyed_again = client.submit("shapes", "idem", {"order": 2}, idempotency_key="abc")
    other = client.submit("shapes", "idem", {"order": 2})
    assert first.created and not again.created and first.task_uuid == again.task_uuid
    assert keyed.task_uuid == keyed_again.task_uuid and not keyed_again.created
    assert len({first.task_uuid, keyed.task_uuid, other.task_uuid}) == 3
    assert count(database_url, "SELECT count(*) FROM tasker.tasks") == 3
    assert count(database_url, "SELECT count(*) FROM pgmq.q_tasker_worker_shapes_queue") == 3


def test_always_unique_and_caller_provided_strategies(
    broker: PGMQBroker, client: tasker.Client
) -> None:
    unique = tasker.Workflow("shapes", "uniq", identity_strategy="always_unique", register=False)
    unique.step("only")(lambda ctx: None)
    register(broker, client, unique)
    a = client.submit("shapes", "uniq", {"x": 1})
    b = client.submit("shapes", "uniq", {"x": 1})
    assert a.task_uuid != b.task_uuid
    keyed = tasker.Workflow("shapes", "keyed", identity_strategy="caller_provided", register=False)
    keyed.step("only")(lambda ctx: None)
    register(broker, client, keyed)
    with pytest.raises(tasker.PayloadError, match="idempotency_key"):
        client.submit("shapes", "keyed", {"x": 1})


def test_transactional_submit_rolled_back_leaves_nothing(
    broker: PGMQBroker, client: tasker.Client, database_url: str
) -> None:
    register(broker, client, build_flow("txn", LINEAR, Recorder()))
    with psycopg.connect(database_url) as conn:
        handle = client.submit("shapes", "txn", {"n": 1}, connection=conn)
        assert handle.created
        conn.rollback()
    assert count(database_url, "SELECT count(*) FROM tasker.tasks") == 0
    assert count(database_url, "SELECT count(*) FROM tasker.workflow_steps") == 0
    assert count(database_url, "SELECT count(*) FROM pgmq.q_tasker_worker_shapes_queue") == 0
    with psycopg.connect(database_url) as conn:
        client.submit("shapes", "txn", {"n": 1}, connection=conn)
        conn.commit()
    assert count(database_url, "SELECT count(*) FROM pgmq.q_tasker_worker_shapes_queue") == 1


def test_bad_requests_fail_before_anything_is_written(
    broker: PGMQBroker, client: tasker.Client, database_url: str
) -> None:
    register(broker, client, build_flow("strict", LINEAR, Recorder()))
    with pytest.raises(tasker.TemplateNotFoundError, match="register"):
        client.submit("shapes", "nope", {})
    with pytest.raises(tasker.PayloadError, match=r"NaN|nan"):
        client.submit("shapes", "strict", {"x": float("nan")})
    with pytest.raises(tasker.PayloadError, match="NUL"):
        client.submit("shapes", "strict", {"x": "a\x00"})
    with pytest.raises(tasker.PayloadError, match="limit"):
        client.submit("shapes", "strict", {"x": "y" * (1024 * 1024 + 1)})
    with pytest.raises(tasker.PayloadError, match="priority"):
        client.submit("shapes", "strict", {}, priority=500)
    assert count(database_url, "SELECT count(*) FROM tasker.tasks") == 0


def test_ten_concurrent_finalizers_make_exactly_one_final_transition(
    broker: PGMQBroker, client: tasker.Client, worker: dramatiq.Worker, database_url: str
) -> None:
    register(broker, client, build_flow("fin", LINEAR, Recorder()))
    handle = client.submit("shapes", "fin", {})
    with psycopg.connect(database_url, autocommit=True) as conn:
        # run the steps, but hold the task back from finalizing: claim it ourselves first
        assert claim_finalization(conn, handle.task_uuid, "test-holder", 30).claimed
    worker.start()
    from tests.support import wait_for

    wait_for(  # the worker's own finalizer met our claim (contention) and backed off
        lambda: (
            count(
                database_url,
                "SELECT count(*) FROM tasker.finalization_attempts"
                " WHERE holder <> 'test-holder' AND NOT succeeded",
            )
            >= 1
        ),
        20,
        "the worker's finalization attempt",
    )
    assert client.status(handle.task_uuid).state == "evaluating_results"
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert release_finalization(conn, handle.task_uuid, "test-holder")
    barrier = threading.Barrier(10)

    def finalizer(i: int) -> tuple[bool, str | None]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            barrier.wait()
            claim = claim_finalization(conn, handle.task_uuid, f"finalizer-{i}", 30)
            final = finalize_task(conn, handle.task_uuid) if claim.claimed else None
            if claim.claimed:
                release_finalization(conn, handle.task_uuid, f"finalizer-{i}")
            return claim.claimed, final

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(finalizer, range(10)))
    finals = [final for _, final in results if final]
    assert finals == ["complete"]
    assert (
        count(
            database_url,
            "SELECT count(*) FROM tasker.task_transitions"
            " WHERE task_uuid = %s AND to_state = 'complete'",
            handle.task_uuid,
        )
        == 1
    )
    attempts = count(
        database_url, "SELECT count(*) FROM tasker.finalization_attempts WHERE action = 'claim'"
    )
    assert attempts >= 12  # every attempt is audited
    from tasker.middleware.finalization import FinalizationClaim

    claims = next(m for m in broker.middleware if isinstance(m, FinalizationClaim))
    assert claims.attempts >= 1 and claims.contention >= 1  # the worker's finalizer backed off


def test_siblings_finishing_at_the_same_instant_never_lose_the_join(
    broker: PGMQBroker, client: tasker.Client, worker: dramatiq.Worker
) -> None:
    wide = {
        "start": [],
        **{f"b{i}": ["start"] for i in range(12)},
        "end": [f"b{i}" for i in range(12)],
    }
    gate = threading.Barrier(4, timeout=10)
    recorder = Recorder()
    flow = build_flow("join", wide, recorder)
    original = {name: step.handler for name, step in flow.steps.items()}

    def synchronised(name: str) -> Any:
        def handler(ctx: tasker.StepContext) -> Any:
            if name.startswith("b"):
                gate.wait()  # four siblings complete together, three times over
            assert original[name] is not None
            return original[name](ctx)

        return handler

    for name in list(flow.steps):
        step = flow.steps[name]
        flow.steps[name] = type(step)(**{**step.__dict__, "handler": synchronised(name)})
    register(broker, client, flow)
    worker.start()
    handle = client.submit("shapes", "join", {})
    status = client.wait(handle.task_uuid, timeout=30)
    assert status.state == "complete"
    assert status.step("end").result == {"value": 25}  # 12 siblings x 2, plus 1
    assert recorder.names().count("end") == 1


def test_the_same_step_message_delivered_twice_records_one_result(
    broker: PGMQBroker, client: tasker.Client, worker: dramatiq.Worker, database_url: str
) -> None:
    recorder = Recorder()
    register(broker, client, build_flow("dup", DIAMOND, recorder))
    handle = client.submit("shapes", "dup", {})
    with psycopg.connect(database_url, autocommit=True) as conn:
        step_uuid = conn.execute(
            "SELECT workflow_step_uuid FROM tasker.workflow_steps WHERE name = 'start'"
        ).fetchone()[0]
        with conn.transaction():  # a second copy of the root step's message
            BrokerSender(broker).send_steps(
                conn,
                [
                    tasker.engine.messages.StepMessage(
                        "worker_shapes_queue",
                        "tasker.shapes.dup.start",
                        handle.task_uuid,
                        str(step_uuid),
                    )
                ],
            )
    worker.start()
    status = client.wait(handle.task_uuid, timeout=20)
    broker.join("worker_shapes_queue", timeout=10_000)
    assert status.state == "complete"
    assert recorder.names().count("start") == 1
    assert status.step("start").attempts == 1
    assert (
        count(
            database_url,
            "SELECT count(*) FROM tasker.workflow_step_transitions t"
            " JOIN tasker.workflow_steps s USING (workflow_step_uuid)"
            " WHERE s.name = 'start' AND t.to_state = 'complete'",
        )
        == 1
    )

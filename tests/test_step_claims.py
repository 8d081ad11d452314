"""Step claims with leases: a re-sent or redelivered step message re-claims its step only after the
previous claim's lease ran out, never while a live attempt holds it; deliveries are never lost to a
failed retry."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.message import Message

import tasker
from tasker.brokers.errors import BrokerConnectionError
from tasker.brokers.pgmq import PGMQBroker, PGMQMessageProxy
from tasker.engine.messages import StepMessage
from tasker.engine.steps import ClaimOutcome, StepRunner, claim_step
from tasker.runtime.sender import BrokerSender
from tasker.runtime.workflows import step_executor
from tests.shapes import LINEAR, Recorder, build_flow
from tests.support import InProcessFlows, scalar, wait_for

QUEUE = "pgmq.q_tasker_worker_shapes_queue"


def root_step(url: str, task_uuid: str, name: str = "s1") -> str:
    return str(
        scalar(
            url,
            "SELECT workflow_step_uuid FROM tasker.workflow_steps WHERE task_uuid = %s"
            " AND name = %s",
            (task_uuid, name),
        )
    )


RUNNER = StepRunner("shapes", "claims", lambda ctx: None)


def claim(url: str, task: str, step: str, token: str, lease_s: float = 30.0) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        return claim_step(conn, RUNNER, task, step, token=token, lease_s=lease_s)


def expire_claim(url: str, step: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tasker.workflow_steps SET claimed_until = now() - interval '1 second'"
            " WHERE workflow_step_uuid = %s",
            (step,),
        )


def test_claim_semantics(flows: InProcessFlows) -> None:
    client, database_url = flows.client, flows.url
    flow = build_flow("claims", LINEAR, Recorder())
    client.register(flow)
    task = client.submit("shapes", "claims", {}).task_uuid
    step = root_step(database_url, task)

    first = claim(database_url, task, step, "delivery-a")
    assert first.outcome is ClaimOutcome.CLAIMED and first.attempt == 1
    assert first.context is not None and 29 < first.lease_left_s <= 30
    again = claim(database_url, task, step, "delivery-a")  # same delivery, lost its answer
    assert again.outcome is ClaimOutcome.REPEATED and again.attempt == 1
    other = claim(database_url, task, step, "delivery-b")  # a copy, while the claim is live
    assert other.outcome is ClaimOutcome.BUSY and other.context is None and other.lease_left_s > 0
    assert (
        scalar(
            database_url,
            "SELECT attempts FROM tasker.workflow_steps WHERE workflow_step_uuid = %s",
            (step,),
        )
        == 1
    )
    expire_claim(database_url, step)
    taken = claim(database_url, task, step, "delivery-b")  # the first worker died
    assert taken.outcome is ClaimOutcome.RECLAIMED and taken.attempt == 2
    expire_claim(database_url, step)
    assert claim(database_url, task, step, "delivery-c").attempt == 3
    expire_claim(database_url, step)
    assert claim(database_url, task, step, "delivery-d").outcome is ClaimOutcome.EXHAUSTED
    later = root_step(database_url, task, "s2")
    assert claim(database_url, task, later, "x").outcome is ClaimOutcome.SKIPPED  # pending
    missing = claim(database_url, task, "00000000-0000-0000-0000-000000000000", "x")
    assert missing.outcome is ClaimOutcome.MISSING


def send_copy(broker: PGMQBroker, database_url: str, task: str, step: str, actor: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        message = StepMessage("worker_shapes_queue", actor, task, step)
        BrokerSender(broker).send_steps(conn, [message])


def test_a_copy_sent_while_the_step_runs_waits_and_never_runs_it_twice(
    flows: InProcessFlows,
) -> None:
    client, database_url = flows.client, flows.url
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []
    flow = tasker.Workflow("shapes", "busy", version="1.0.0", register=False)

    @flow.step(max_attempts=3)
    def hold(ctx: tasker.StepContext) -> dict[str, int]:
        runs.append(ctx.attempt)
        started.set()
        assert release.wait(30)
        return {"attempt": ctx.attempt}

    flows.start(flow)
    task = client.submit("shapes", "busy", {}).task_uuid
    assert started.wait(30)
    step = root_step(database_url, task, "hold")
    send_copy(flows.broker, database_url, task, step, flow.actor_name("hold"))
    wait_for(  # the copy was delivered, met the live claim, and was put back for later
        lambda: (
            scalar(database_url, f"SELECT count(*) FROM {QUEUE} WHERE read_ct >= 1") == 2
            and scalar(database_url, f"SELECT count(*) FROM {QUEUE} WHERE vt > now()") == 2
        ),
        20,
        "the copy to be deferred",
    )
    release.set()
    status = client.wait(task, timeout=30)
    wait_for(lambda: scalar(database_url, f"SELECT count(*) FROM {QUEUE}") == 0, 30, "the copy")
    assert status.state == "complete"
    assert runs == [1]
    assert client.status(task).step("hold").attempts == 1


def test_a_step_whose_worker_died_is_reclaimed_after_its_lease(flows: InProcessFlows) -> None:
    client, database_url = flows.client, flows.url
    recorder = Recorder()
    flow = build_flow("orphan", LINEAR, recorder)
    flows.register(flow)
    task = client.submit("shapes", "orphan", {}).task_uuid
    step = root_step(database_url, task)
    # A worker claims the step and dies: its message is still queued, its claim runs out soon.
    assert claim(database_url, task, step, "dead-worker", lease_s=1.0).attempt == 1
    flows.start()
    status = client.wait(task, timeout=30)
    assert status.state == "complete"
    assert status.step("s1").attempts == 2
    assert recorder.names().count("s1") == 1


def test_a_step_whose_worker_died_on_its_last_attempt_fails_as_worker_died(
    flows: InProcessFlows,
) -> None:
    client, database_url = flows.client, flows.url
    flow = tasker.Workflow("shapes", "last", version="1.0.0", register=False)
    flow.step("only", max_attempts=1)(lambda ctx: {"ran": True})
    flows.register(flow)
    task = client.submit("shapes", "last", {}).task_uuid
    assert claim(database_url, task, root_step(database_url, task, "only"), "dead", 1.0).attempt
    flows.start()
    status = client.wait(task, timeout=30)
    only = status.step("only")
    assert status.state == "blocked_by_failures" and only.state == "error" and only.attempts == 1
    assert only.error is not None and only.error["error_type"] == "worker_died"
    wait_for(lambda: scalar(database_url, f"SELECT count(*) FROM {QUEUE}") == 0, 10, "settled")


def deliver(broker: PGMQBroker, queue: str = "default") -> PGMQMessageProxy:
    consumer = broker.consume(queue, prefetch=1, timeout=1000)
    for _ in range(50):
        proxy = next(consumer)
        if proxy is not None:
            assert isinstance(proxy, PGMQMessageProxy)
            return proxy
    raise AssertionError("no message was delivered")


def plain_message(broker: PGMQBroker) -> Message[Any]:
    if "a" not in broker.actors:  # a message of an unknown actor would wait for one
        dramatiq.actor(actor_name="a", broker=broker)(lambda n: None)
    return Message(queue_name="default", actor_name="a", args=(1,), kwargs={}, options={})


def test_a_retry_replaces_the_delivery_atomically(broker: PGMQBroker, database_url: str) -> None:
    broker.declare_queue("default")
    broker.enqueue(plain_message(broker))
    proxy = deliver(broker)
    proxy.options["retries"] = 1
    broker.enqueue(proxy, delay=60_000)  # what Dramatiq's Retries middleware does
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT msg_id, read_ct, vt > now() + interval '50 seconds' FROM pgmq.q_tasker_default"
        ).fetchall()
    assert len(rows) == 1 and rows[0][0] != proxy.msg_id and rows[0][1:] == (0, True)
    broker.consume("default").ack(proxy)  # the worker acks afterwards: nothing more is deleted
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default") == 1
    broker.enqueue(proxy)  # a second retry of the same delivery changes nothing
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default") == 1


def test_a_failed_retry_never_removes_the_delivery(
    broker: PGMQBroker, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.declare_queue("default")
    broker.enqueue(plain_message(broker))
    proxy = deliver(broker)

    def down(*args: Any, **kwargs: Any) -> None:
        raise BrokerConnectionError("PostgreSQL is down")

    monkeypatch.setattr(broker, "_write", down)
    with pytest.raises(BrokerConnectionError):
        broker.enqueue(proxy, delay=10)
    monkeypatch.undo()
    broker.consume("default").ack(proxy)  # the ack that follows must not delete it either
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default") == 1
    assert broker.leases.count(proxy.pgmq_names.main) == 0  # and its lease is left to run out


def test_the_heartbeat_extends_running_claims_and_a_forced_exit_releases_them(
    flows: InProcessFlows,
) -> None:
    broker, client, database_url = flows.broker, flows.client, flows.url
    client.register(build_flow("beat", LINEAR, Recorder()))
    task = client.submit("shapes", "beat", {}).task_uuid
    step = root_step(database_url, task)
    assert claim(database_url, task, step, "me", lease_s=2.0).attempt == 1
    executor = step_executor(broker)
    executor._held.hold(step, 1)  # as if a handler of this process ran it
    until = (
        "SELECT extract(epoch FROM claimed_until - now()) FROM tasker.workflow_steps"
        " WHERE workflow_step_uuid = %s"
    )
    executor.extend()
    assert scalar(database_url, until, (step,)) > 4  # renewed for a full lease (5 s here)
    broker.release_held()  # the lease hooks: a forced exit gives the claims up
    assert scalar(database_url, until, (step,)) <= 0
    assert claim(database_url, task, step, "next").outcome is ClaimOutcome.RECLAIMED


def test_a_forced_exit_makes_held_messages_visible_at_once(
    broker: PGMQBroker, database_url: str
) -> None:
    broker.declare_queue("default")
    broker.enqueue(plain_message(broker))
    deliver(broker)
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default WHERE vt > now()") == 1
    assert broker.release_held() == 1
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default WHERE vt > now()") == 0

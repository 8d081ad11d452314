"""The step claim folded into the message claim (decision 0014): a first delivery of a step
message claims its step in the consumer's statement, and every check that must not cost an
attempt still comes first."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from dramatiq.message import Message

import tasker
from tasker.brokers.consumer import PGMQMessageProxy
from tasker.engine import steps
from tasker.runtime.steps import step_actors
from tests.shapes import LINEAR, Recorder, build_flow
from tests.support import InProcessFlows, scalar


@pytest.fixture
def worker_claims(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The steps the worker claimed itself (not with their message)."""
    claimed: list[str] = []
    real = steps.StepExecutor._claim

    def counting(self: Any, runner: Any, task_uuid: str, step_uuid: str, token: str) -> Any:
        claimed.append(step_uuid)
        return real(self, runner, task_uuid, step_uuid, token)

    monkeypatch.setattr(steps.StepExecutor, "_claim", counting)
    return claimed


def _steps(url: str, task: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT name, state, attempts FROM tasker.workflow_steps WHERE task_uuid = %s"
            " ORDER BY name",
            (task,),
        ).fetchall()
    return [tuple(row) for row in rows]


def _claim_rows(flows: InProcessFlows, flow: Any, **overrides: Any) -> list[tuple[Any, ...]]:
    """Run the folded claim statement on ``flow``'s queue once, as the consumer would."""
    names = flows.broker.names(flow.queue_name)
    found = step_actors(flows.broker).co_claimer.claim_statement(names)
    assert found is not None
    statement, params = found
    params = {"limit": 10, "lease_ms": 30_000, **params, **overrides}
    with psycopg.connect(flows.url, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(statement, params).fetchall()]


def _visible_again(url: str, flow: Any, flows: InProcessFlows) -> None:
    table = flows.broker.names(flow.queue_name).main
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE pgmq.\"q_{table}\" SET vt = now() - interval '1 second'")


def test_steps_are_claimed_with_their_messages(
    flows: InProcessFlows, worker_claims: list[str]
) -> None:
    recorder = Recorder()
    status = flows.run(build_flow("folded", LINEAR, recorder), {})
    assert status.state == "complete"
    assert worker_claims == []  # every first delivery came claimed
    assert recorder.runs == [("s1", 1), ("s2", 1), ("s3", 1), ("s4", 1)]
    assert {attempts for _, _, attempts in _steps(flows.url, status.task_uuid)} == {1}


def test_a_step_with_a_breaker_passes_it_in_the_worker_before_its_claim(
    flows: InProcessFlows, worker_claims: list[str]
) -> None:
    flow = tasker.Workflow("shapes", "guarded", version="1.0.0", register=False)

    @flow.step(breaker="guarded_api")
    def call_api(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"ok": True}

    @flow.step(depends_on=["call_api"])
    def after(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"ok": True}

    status = flows.run(flow, {})
    assert status.state == "complete"
    [claimed] = worker_claims
    assert (
        scalar(
            flows.url,
            "SELECT name FROM tasker.workflow_steps WHERE workflow_step_uuid = %s",
            (claimed,),
        )
        == "call_api"
    )


def test_only_first_deliveries_of_known_actors_and_enqueued_steps_are_claimed(
    flows: InProcessFlows,
) -> None:
    flow = build_flow("checks", LINEAR, Recorder())
    flows.register(flow)
    task = flows.client.submit("shapes", "checks", {}).task_uuid
    # an actor this worker does not have: the message alone is claimed
    [row] = _claim_rows(flows, flow, actors=["tasker.shapes.other@1.0.0.s1"])
    assert row[1] == 1 and row[4] is None
    assert _steps(flows.url, task)[0] == ("s1", "enqueued", 0)
    _visible_again(flows.url, flow, flows)
    # a redelivery: the worker claims the step (it may hold it already)
    [row] = _claim_rows(flows, flow)
    assert row[1] == 2 and row[4] is None
    # a first delivery: claimed with its step, with the delivery's token
    flows.client.submit("shapes", "checks", {})
    [row] = [r for r in _claim_rows(flows, flow) if r[1] == 1]
    answer = row[4]
    assert answer["outcome"] == "claimed" and answer["attempt"] == 1 and answer["name"] == "s1"
    assert 0 < answer["lease_left_s"] <= flows.broker.visibility_timeout_ms / 1000
    assert answer["parent_results"] == {}
    token = scalar(
        flows.url,
        "SELECT claim_token FROM tasker.workflow_steps WHERE workflow_step_uuid = %s",
        (Message.decode(row[2].encode()).args[1],),
    )
    assert token == f"{flows.broker.names(flow.queue_name).main}:{row[0]}:1"


def test_a_step_of_a_finished_task_uses_no_attempt(flows: InProcessFlows) -> None:
    flow = build_flow("finished", LINEAR, Recorder())
    flows.register(flow)
    task = flows.client.submit("shapes", "finished", {}).task_uuid
    with psycopg.connect(flows.url, autocommit=True) as conn:  # given up by the coordinator
        conn.execute("UPDATE tasker.tasks SET state = 'error' WHERE task_uuid = %s", (task,))
    [row] = _claim_rows(flows, flow)
    assert row[4]["outcome"] == "task_finished"
    assert _steps(flows.url, task)[0] == ("s1", "enqueued", 0)


def test_a_message_that_is_not_a_step_message_is_left_to_the_worker(
    flows: InProcessFlows,
) -> None:
    flow = build_flow("garbage", LINEAR, Recorder())
    flows.register(flow)
    actor = flow.actor_name("s1")
    for args in (["not-a-task", "not-a-uuid"], [], "scalar"):
        flows.broker.enqueue(Message(flow.queue_name, actor, args, {}, {}))
    rows = _claim_rows(flows, flow)
    assert len(rows) == 3 and all(row[4] is None for row in rows)


def test_deliveries_given_back_unrun_return_their_attempt(flows: InProcessFlows) -> None:
    flow = build_flow("given_back", LINEAR, Recorder())
    flows.register(flow)
    task = flows.client.submit("shapes", "given_back", {}).task_uuid
    [row] = _claim_rows(flows, flow)
    assert _steps(flows.url, task)[0] == ("s1", "in_progress", 1)
    names = flows.broker.names(flow.queue_name)
    proxy = PGMQMessageProxy(Message.decode(row[2].encode()), names, row[0], row[1])
    proxy.co_claim = row[4]
    flows.broker.consume(flow.queue_name).requeue([proxy])  # a shutdown: never ran
    assert _steps(flows.url, task)[0] == ("s1", "in_progress", 0)
    # the next delivery re-claims it at once, as attempt 1
    [again] = _claim_rows(flows, flow)
    assert again[1] == 2
    with psycopg.connect(flows.url, autocommit=True) as conn:
        claim = steps.claim_step(
            conn,
            steps.StepRunner("shapes", "given_back", lambda ctx: None),
            task,
            str(proxy.args[1]),
            token="next-delivery",
            lease_s=30,
        )
    assert claim.outcome == steps.ClaimOutcome.RECLAIMED and claim.attempt == 1


def test_the_actor_list_reaches_postgresql_as_it_is(flows: InProcessFlows) -> None:
    from tasker.runtime.step_claims import _array_literal

    names = ["tasker.a.b@1.0.0.s1", 'odd"name', "back\\slash", "comma,brace}"]
    with psycopg.connect(flows.url) as conn:
        row = conn.execute("SELECT %s::text[]", (_array_literal(names),)).fetchone()
    assert row is not None and row[0] == names

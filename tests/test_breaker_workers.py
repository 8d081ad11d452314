"""Circuit breakers in running workers, on real PostgreSQL.

* The database breaker: a private PostgreSQL is stopped under a running worker; its consumers stop
  claiming (no busy loop), and after the restart every message is processed as expected.
  Meanwhile the worker process is not ready (what its pod's ``/health/ready`` reads) and
  ``tasker_circuit_breaker_state{breaker="database"}`` is 1 or 2; both are back after it closes.
* A step breaker: one worker's failures open it; another worker's deliveries of that step are
  deferred without a claim (counted as the claim outcome ``breaker_open``), so they use no
  attempt and are never dead-lettered whatever their read count; half-open trials close it and
  every task completes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

import tasker
from tasker import readiness
from tasker.breakers import BreakerPolicy, add_listener, remove_listener
from tasker.brokers.consumer import PGMQConsumer
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.steps import step_actors
from tasker.runtime.workflows import (
    DATABASE_BREAKER_READINESS,
    configure_breakers,
    step_executor,
)
from tasker.settings import BreakerSettings
from tests.private_postgres import PrivatePostgres
from tests.support import InProcessFlows, reporting_readiness, scalar


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it is truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def breaker_changes() -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    def on_change(name: str, state: str) -> None:
        seen.append((name, state))

    add_listener(on_change)
    yield seen
    remove_listener(on_change)


# -- the database breaker ----------------------------------------------------------------------


def retry_then_succeed_flow(calls: Counter[int]) -> tasker.Workflow:
    flow = tasker.Workflow("outage", "retry_once", register=False)

    @flow.step(max_attempts=5)
    def work(ctx: tasker.StepContext) -> dict[str, int]:
        calls[ctx.task_context["n"]] += 1
        if ctx.attempt == 1:  # the retry waits in PGMQ (a delayed message) through the outage
            raise tasker.RetryableError("first attempt", retry_after=5)
        return {"n": ctx.task_context["n"]}

    return flow


@pytest.fixture
def pod_ready(tmp_path: Path) -> Iterator[Callable[[], bool]]:
    """This process reports its readiness as a booted worker process; ``() -> ready``: what its
    pod's ``/health/ready`` makes of it."""
    with reporting_readiness(tmp_path) as ready:
        yield ready


def breaker_gauge(name: str) -> float | None:
    """``tasker_circuit_breaker_state{breaker=name}`` of this process."""
    return REGISTRY.get_sample_value("tasker_circuit_breaker_state", {"breaker": name})


@pytest.mark.slow
def test_the_database_breaker_stops_claims_while_postgresql_is_down(
    private_postgres: PrivatePostgres,
    private_database_url: str,
    *,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    breaker_changes: list[tuple[str, str]],
    pod_ready: Callable[[], bool],
) -> None:
    open_s = 0.5
    broker = PGMQBroker(
        url=private_database_url,
        visibility_timeout_ms=20_000,
        poll_interval_ms=100,
        timeout_s=1,
        database_policy=BreakerPolicy(
            failure_threshold=3,
            window_s=30,
            open_s=open_s,
            half_open_successes=1,
            success_resets=True,
        ),
    )
    flows = InProcessFlows(broker, private_database_url)
    step_executor(broker).retry_window_s = 120  # a record that meets the outage waits it out
    claims = Counter[str]()
    real_claim = PGMQConsumer._claim

    def counting_claim(self: PGMQConsumer, limit: int) -> Any:
        claims["claims"] += 1
        return real_claim(self, limit)

    monkeypatch.setattr(PGMQConsumer, "_claim", counting_claim)
    calls: Counter[int] = Counter()
    flow = retry_then_succeed_flow(calls)
    breaker = broker.database_breaker

    def held_back() -> bool:
        return DATABASE_BREAKER_READINESS in readiness.process_status().not_ready

    try:
        assert pod_ready() and breaker_gauge("database") in (None, 0.0)
        flows.start(flow)
        handles = [flows.client.submit("outage", "retry_once", {"n": n}) for n in range(6)]
        wait_for(
            lambda: (
                scalar(
                    private_database_url,
                    "SELECT count(*) FROM tasker.workflow_steps WHERE state = 'waiting_for_retry'",
                )
                == 6
            ),
            "every first attempt to fail",
        )
        private_postgres.stop("fast")
        wait_for(lambda: breaker.state is tasker.breakers.BreakerState.OPEN, "the breaker to open")
        # The listeners run just after the change; the file is written just after the memory.
        wait_for(lambda: not pod_ready(), "the pod's /health/ready to answer 503")
        assert held_back()
        assert breaker_gauge("database") in (1.0, 2.0)  # open, or half-open while it probes
        # While it is open: no claim at all, a probe per open window, no error lines.
        claims_before, probes_before = claims["claims"], breaker.probes
        caplog.clear()
        started = time.monotonic()
        wait_for(lambda: breaker.probes >= probes_before + 3, "three probes")
        elapsed = time.monotonic() - started
        assert claims["claims"] == claims_before
        assert breaker.probes - probes_before <= elapsed / open_s + 2
        assert breaker.state is not tasker.breakers.BreakerState.CLOSED
        assert held_back() and not pod_ready()  # through every probe, open or half-open
        noisy = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert noisy == [], [r.getMessage() for r in noisy]

        private_postgres.start()
        wait_for(breaker.is_closed, "the breaker to close after the restart")
        wait_for(pod_ready, "the pod's /health/ready to answer 200 again")
        assert not held_back()
        assert breaker_gauge("database") == 0
        statuses = [flows.client.wait(h.task_uuid, timeout=90) for h in handles]
    finally:
        flows.stop()
        broker.close()
    assert [s.state for s in statuses] == ["complete"] * 6
    assert calls == Counter({n: 2 for n in range(6)})  # each attempt ran once, none was lost
    assert [s.step("work").attempts for s in statuses] == [2] * 6
    assert ("database", "open") in breaker_changes
    assert breaker_changes[-1] == ("database", "closed")
    dead = scalar(
        private_database_url, "SELECT count(*) FROM pgmq.q_tasker_worker_outage_queue__xq"
    )
    assert dead == 0


# -- a step breaker shared by two workers ------------------------------------------------------

BREAKERS = BreakerSettings(
    failure_threshold=3,
    window_s=60.0,
    open_s=3.0,
    half_open_successes=2,
    half_open_trials=1,
    cache_ttl_s=0.2,
    max_defer_s=0.3,
)


def test_a_step_breaker_opened_by_one_worker_holds_the_steps_of_another(
    database_url: str, breaker_changes: list[tuple[str, str]]
) -> None:
    gateway_up = threading.Event()
    calls: list[tuple[str, int, bool]] = []  # (worker, task n, gateway up)
    lock = threading.Lock()
    brokers = {
        "a": PGMQBroker(url=database_url, visibility_timeout_ms=10_000, poll_interval_ms=100),
        "b": PGMQBroker(
            url=database_url, visibility_timeout_ms=10_000, poll_interval_ms=100, max_deliveries=2
        ),
    }
    flow = tasker.Workflow("pay", "checkout", register=False)

    @flow.step(
        breaker="payments",
        max_attempts=100,
        backoff=tasker.BackoffPolicy(base_seconds=0.1, max_seconds=0.2, jitter=0),
    )
    def charge(ctx: tasker.StepContext) -> dict[str, int]:
        thread_broker = getattr(threading.current_thread(), "broker", None)
        worker = next(name for name, b in brokers.items() if b is thread_broker)
        up = gateway_up.is_set()
        with lock:
            calls.append((worker, ctx.task_context["n"], up))
        if not up:
            raise ConnectionError("payment gateway unreachable")
        return {"charged": ctx.task_context["n"]}

    workers = {name: InProcessFlows(b, database_url) for name, b in brokers.items()}
    for b in brokers.values():
        configure_breakers(b, BREAKERS)
    row = "SELECT {} FROM tasker.circuit_breakers WHERE name = 'payments'"
    held_labels = {"namespace": "pay", "workflow": "checkout", "outcome": "breaker_open"}
    held_before = REGISTRY.get_sample_value("tasker_step_claims_total", held_labels) or 0.0
    try:
        # 1. Worker a alone: three failures open the breaker, for everyone.
        workers["a"].start(flow)
        first = [workers["a"].client.submit("pay", "checkout", {"n": n}) for n in range(3)]
        wait_for(lambda: scalar(database_url, row.format("state")) == "open", "a to open it")
        workers["a"].stop()
        opened_before_b = scalar(database_url, row.format("times_opened"))
        # 2. Worker b: its deliveries of the step wait without a claim.
        workers["b"].register(flow)
        later = [workers["b"].client.submit("pay", "checkout", {"n": n}) for n in (3, 4)]
        workers["b"].start(flow)
        held = """
            SELECT count(*) FROM pgmq.q_tasker_worker_pay_queue m
            JOIN tasker.workflow_steps ws ON ws.workflow_step_uuid::text = m.message->'args'->>1
            WHERE ws.task_uuid = ANY(%s::uuid[]) AND ws.attempts = 0 AND ws.state = 'enqueued'
              AND m.read_ct > 2
        """
        later_ids = [h.task_uuid for h in later]
        wait_for(
            lambda: scalar(database_url, held, (later_ids,)) >= 1,
            "a delivery of b read more than max_deliveries times, still unclaimed",
        )
        # 3. The gateway comes back: the next half-open trials succeed and close it.
        gateway_up.set()
        statuses = [workers["b"].client.wait(h.task_uuid, timeout=90) for h in first + later]
        wait_for(lambda: scalar(database_url, row.format("state")) == "closed", "it to close")
    finally:
        for runner in workers.values():
            runner.stop()
        for b in brokers.values():
            b.close()

    assert [s.state for s in statuses] == ["complete"] * 5
    runs = Counter(n for _, n, _ in calls)
    for n, status in enumerate(statuses):
        assert status.step("charge").attempts == runs[n], n  # every attempt used was a run
    assert all(n in (0, 1, 2) for worker, n, _ in calls if worker == "a")
    # Every run of b while the gateway was down was a half-open trial: each one failed and
    # opened the breaker again. (a's first failures opened it once, or more if a ran trials.)
    b_down = sum(1 for worker, _, up in calls if worker == "b" and not up)
    assert scalar(database_url, row.format("times_opened")) == opened_before_b + b_down
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_worker_pay_queue__xq") == 0
    seen = {state for name, state in breaker_changes if name == "payments"}
    assert seen == {"open", "half_open", "closed"}
    # The deferred deliveries reached the metrics, as deliveries that asked for no claim.
    held = REGISTRY.get_sample_value("tasker_step_claims_total", held_labels) or 0.0
    assert held - held_before >= 1
    assert breaker_gauge("payments") == 0


def test_a_closed_breaker_costs_no_statement_per_step(
    flows: InProcessFlows, database_url: str
) -> None:
    flow = tasker.Workflow("pay", "cheap", register=False)

    @flow.step(breaker="payments")
    def charge(ctx: tasker.StepContext) -> dict[str, bool]:
        return {"charged": True}

    breakers = step_actors(flows.broker).breakers
    breakers.cache_ttl_s = 3600.0  # one copy for the whole test
    statuses = [flows.run(flow, {"n": n}) for n in range(10)]
    assert [s.state for s in statuses] == ["complete"] * 10
    assert breakers.statements == 1  # the first step read the copy; the other nine read nothing
    assert scalar(database_url, "SELECT count(*) FROM tasker.circuit_breakers") == 0


@pytest.mark.slow
def test_an_outcome_waits_out_an_outage_longer_than_its_lease_and_the_claim_window(
    private_postgres: PrivatePostgres, private_database_url: str
) -> None:
    """A handler on its last attempt finishes while PostgreSQL is down for longer than the
    step's lease and the claim's retry window: its outcome is recorded when PostgreSQL is back,
    the redelivered message (its lease ran out) does not re-claim it, the handler ran once."""
    broker = PGMQBroker(
        url=private_database_url,
        visibility_timeout_ms=2_000,
        poll_interval_ms=100,
        timeout_s=1,
        database_policy=BreakerPolicy(
            failure_threshold=3, window_s=30, open_s=0.5, half_open_successes=1
        ),
    )
    flows = InProcessFlows(broker, private_database_url)
    executor = step_executor(broker)
    executor.retry_window_s = 1.0  # the claim's window: far shorter than the outage
    runs: Counter[int] = Counter()
    started = threading.Event()
    release = threading.Event()
    flow = tasker.Workflow("outage", "last_attempt", register=False)

    @flow.step(max_attempts=1)
    def only(ctx: tasker.StepContext) -> dict[str, int]:
        runs[ctx.task_context["n"]] += 1
        started.set()
        assert release.wait(60)
        return {"n": ctx.task_context["n"]}

    try:
        flows.start(flow)
        handle = flows.client.submit("outage", "last_attempt", {"n": 1})
        assert started.wait(60)
        private_postgres.stop("fast")
        release.set()  # the handler returns into the outage
        wait_for(
            lambda: broker.database_breaker.state is tasker.breakers.BreakerState.OPEN,
            "the database breaker to open",
        )
        # longer than the lease (2 s) and the claim's window (1 s): the lease runs out
        outage_until = time.monotonic() + 4.0
        wait_for(lambda: time.monotonic() >= outage_until, "the outage to outlast the lease")
        private_postgres.start()
        status = flows.client.wait(handle.task_uuid, timeout=90)
    finally:
        flows.stop()
        broker.close()
    assert status.state == "complete", status
    assert status.step("only").attempts == 1 and status.step("only").result == {"n": 1}
    assert runs == Counter({1: 1})

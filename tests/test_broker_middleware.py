"""Dramatiq's stock middleware on PGMQBroker, with the Postgres Results and rate-limit backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.middleware import GroupCallbacks, default_middleware
from dramatiq.results import Results

from tasker import PGMQBroker, PostgresRateLimiterBackend, PostgresResultBackend


@pytest.fixture
def full_broker(database_url: str) -> Iterator[PGMQBroker]:
    results = PostgresResultBackend(url=database_url)
    limits = PostgresRateLimiterBackend(url=database_url)
    middleware = [m() for m in default_middleware]
    middleware += [Results(backend=results), GroupCallbacks(limits)]  # type: ignore[no-untyped-call]
    broker = PGMQBroker(url=database_url, middleware=middleware, visibility_timeout_ms=5000)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    worker.start()
    yield broker
    worker.stop()
    broker.close()
    results.close()
    limits.close()


def test_results_pipelines_and_groups_need_no_redis(full_broker: PGMQBroker) -> None:
    @dramatiq.actor(store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    assert add.send(1, 2).get_result(block=True, timeout=10_000) == 3
    pipe = dramatiq.pipeline([add.message(1, 2), add.message(10), add.message(100)]).run()
    assert pipe.get_result(block=True, timeout=10_000) == 113
    group = dramatiq.group(add.message(i, i) for i in range(5)).run()
    assert sorted(group.get_results(block=True, timeout=10_000)) == [0, 2, 4, 6, 8]


def test_group_completion_callback_fires_once(full_broker: PGMQBroker) -> None:
    done = threading.Event()
    calls: list[int] = []

    @dramatiq.actor
    def part(i: int) -> None:
        time.sleep(0.01 * i)

    @dramatiq.actor
    def finished() -> None:
        calls.append(1)
        done.set()

    group = dramatiq.group(part.message(i) for i in range(6))
    group.add_completion_callback(finished.message())
    group.run()
    assert done.wait(15)
    full_broker.join(finished.queue_name, timeout=10_000)
    assert calls == [1]


def test_callbacks_and_stored_exceptions(full_broker: PGMQBroker, database_url: str) -> None:
    seen: list[str] = []

    @dramatiq.actor
    def on_ok(message: dict[str, Any], result: Any) -> None:
        seen.append(f"ok:{result}")

    @dramatiq.actor
    def on_fail(message: dict[str, Any], error: dict[str, Any]) -> None:
        seen.append(f"fail:{error['type']}")

    @dramatiq.actor(max_retries=0, store_results=True)
    def work(fail: bool) -> str:
        if fail:
            raise KeyError("missing")
        return "done"

    work.send_with_options(args=(False,), on_success=on_ok, on_failure=on_fail)
    failed = work.send_with_options(args=(True,), on_success=on_ok, on_failure=on_fail)
    with pytest.raises(dramatiq.results.ResultFailure):
        failed.get_result(block=True, timeout=10_000)
    full_broker.join(work.queue_name, timeout=10_000)
    assert sorted(seen) == ["fail:KeyError", "ok:done"]


def test_time_limit_interrupts_and_retries_then_dead_letters(
    full_broker: PGMQBroker, database_url: str
) -> None:
    attempts: list[float] = []

    @dramatiq.actor(time_limit=300, max_retries=1, min_backoff=10, max_backoff=20)
    def too_slow() -> None:
        attempts.append(time.monotonic())
        for _ in range(100):
            time.sleep(0.05)

    too_slow.send()
    full_broker.join(too_slow.queue_name, timeout=15_000)
    assert len(attempts) == 2
    with psycopg.connect(database_url) as conn:
        error = conn.execute("SELECT headers->>'error' FROM pgmq.q_tasker_default__xq").fetchone()
    assert error is not None and "TimeLimitExceeded" in error[0]

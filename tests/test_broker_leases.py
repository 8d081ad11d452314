"""Leases: the heartbeat keeps a long message from being redelivered, the cap lets a hung one go,
and a worker that lost its lease cannot ack the copy someone else is running."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg
import pytest

from tasker.brokers.consumer import PGMQConsumer
from tasker.brokers.pgmq import PGMQBroker


def make_broker(url: str, **options: Any) -> PGMQBroker:
    broker = PGMQBroker(url=url, visibility_timeout_ms=1000, poll_interval_ms=100, **options)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    return broker


@pytest.fixture
def runs() -> Iterator[list[float]]:
    yield []


def run_long_message(broker: PGMQBroker, runs: list[float], seconds: float) -> None:
    @dramatiq.actor(max_retries=0)
    def long_task() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:  # only the first run hangs
            time.sleep(seconds)

    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        long_task.send()
        broker.join(long_task.queue_name, timeout=20_000)
    finally:
        worker.stop()
        broker.close()


def test_heartbeat_keeps_a_message_longer_than_its_lease(
    database_url: str, runs: list[float]
) -> None:
    run_long_message(make_broker(database_url), runs, seconds=2.6)
    assert len(runs) == 1  # 2.6 s of work under a 1 s lease: extended, never redelivered


def test_max_lease_lets_a_hung_message_go_to_another_thread(
    database_url: str, runs: list[float]
) -> None:
    run_long_message(make_broker(database_url, max_lease_ms=1200), runs, seconds=3.5)
    assert len(runs) == 2  # no longer extended after 1.2 s: delivered again; the hung
    assert runs[1] - runs[0] >= 1.0  # thread's late ack later finds nothing to delete


def test_late_ack_after_a_lost_lease_is_fenced(database_url: str) -> None:
    broker = make_broker(database_url, listen=False)

    @dramatiq.actor
    def job() -> None: ...

    job.send()
    first = broker.consume(job.queue_name, prefetch=1, timeout=500)
    second = broker.consume(job.queue_name, prefetch=1, timeout=500)
    assert isinstance(first, PGMQConsumer) and isinstance(second, PGMQConsumer)
    try:
        delivery = next(first)
        assert delivery is not None
        with psycopg.connect(database_url, autocommit=True) as conn:  # the lease runs out
            conn.execute("UPDATE pgmq.q_tasker_default SET vt = now() - interval '1 second'")
        broker.leases.release("tasker_default", delivery.msg_id)  # its holder stalled
        again = next(second)
        assert again is not None and again.msg_id == delivery.msg_id
        assert again.read_ct == delivery.read_ct + 1 and again.redelivered
        first.ack(delivery)  # late: must not delete the copy being processed
        with psycopg.connect(database_url) as conn:
            left = conn.execute("SELECT count(*) FROM pgmq.q_tasker_default").fetchone()
        assert left == (1,)
        second.ack(again)
        with psycopg.connect(database_url) as conn:
            left = conn.execute("SELECT count(*) FROM pgmq.q_tasker_default").fetchone()
        assert left == (0,)
    finally:
        first.close()
        second.close()
        broker.close()


def test_consumer_returns_within_its_timeout_when_prefetch_is_full(database_url: str) -> None:
    broker = make_broker(database_url)

    @dramatiq.actor
    def job() -> None: ...

    for _ in range(3):
        job.send()
    consumer = broker.consume(job.queue_name, prefetch=1, timeout=300)
    try:
        assert next(consumer) is not None
        started = time.monotonic()
        assert next(consumer) is None  # prefetch 1 is held: no second message
        assert time.monotonic() - started < 1.0
    finally:
        consumer.close()
        broker.close()

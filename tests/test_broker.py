"""Functional behaviour of PGMQBroker with in-process Dramatiq workers and real PostgreSQL."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.errors import QueueJoinTimeout, QueueNotFound
from dramatiq.middleware import AgeLimit, Retries

from tasker.brokers.consumer import PGMQMessageProxy
from tasker.brokers.pgmq import DeadLetteredError, PGMQBroker
from tasker.exceptions import QueueNameError
from tests.support import wait_for


def rows(db: psycopg.Connection[Any], table: str) -> int:
    result = db.execute(f'SELECT count(*) FROM pgmq."{table}"').fetchone()
    assert result is not None
    return int(result[0])


def test_messages_are_processed_and_acked(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    seen: list[int] = []

    @dramatiq.actor
    def record(value: int) -> None:
        seen.append(value)

    for i in range(50):
        record.send(i)
    broker.join(record.queue_name, timeout=10_000)
    worker.join()
    assert sorted(seen) == list(range(50))
    assert rows(db, "q_tasker_default") == 0
    assert rows(db, "q_tasker_default__xq") == 0


def test_delay_is_honoured_by_the_database_clock(
    broker: PGMQBroker, worker: dramatiq.Worker
) -> None:
    ran_at: list[float] = []

    @dramatiq.actor
    def later() -> None:
        ran_at.append(time.monotonic())

    sent = time.monotonic()
    later.send_with_options(delay=1500)
    broker.join(later.queue_name, timeout=10_000)
    assert len(ran_at) == 1
    assert 1.45 <= ran_at[0] - sent < 3.0
    assert "eta" not in later.message().options


def test_retries_create_new_rows_and_end_in_the_dead_letter_queue(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    attempts: list[int] = []

    @dramatiq.actor(max_retries=2, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        attempts.append(1)
        raise RuntimeError("boom")

    flaky.send()
    with pytest.raises(DeadLetteredError):
        broker.join(flaky.queue_name, timeout=10_000, fail_fast=True)
    time.sleep(0.3)
    broker.join(flaky.queue_name, timeout=10_000)
    assert len(attempts) == 3
    dead = db.execute(
        "SELECT message->'options'->>'retries', message->'options'->>'traceback', headers->>'error'"
        " FROM pgmq.q_tasker_default__xq"
    ).fetchall()
    assert len(dead) == 1
    retries, traceback, error = dead[0]
    assert retries == "3"
    assert "RuntimeError: boom" in traceback
    assert "boom" in error


def test_retry_delay_has_millisecond_precision(broker: PGMQBroker, worker: dramatiq.Worker) -> None:
    times: list[float] = []

    @dramatiq.actor(max_retries=1)
    def once_more() -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise dramatiq.Retry(delay=700)

    once_more.send()
    broker.join(once_more.queue_name, timeout=10_000)
    assert len(times) == 2
    assert 0.68 <= times[1] - times[0] < 2.0


def test_a_message_past_its_age_limit_is_dead_lettered(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    @dramatiq.actor(max_age=1)
    def too_old() -> None:
        raise AssertionError("must not run")

    message = too_old.message().copy(message_timestamp=int(time.time() * 1000) - 60_000)
    broker.enqueue(message)
    broker.join(too_old.queue_name, timeout=10_000)
    actors = {
        row[0]
        for row in db.execute("SELECT headers->>'actor' FROM pgmq.q_tasker_default__xq").fetchall()
    }
    assert actors == {"too_old"}
    assert any(isinstance(m, AgeLimit) for m in broker.middleware)


def test_a_message_for_an_unknown_actor_waits_for_a_worker_that_has_it(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    """A rolling deploy: the message is neither run nor dead-lettered; it comes back with a
    growing delay, counted neither as a start nor as a delivery, until the actor exists."""
    seen: list[int] = []
    broker.declare_queue("default")
    broker.enqueue(
        dramatiq.Message(
            queue_name="default", actor_name="arrives_later", args=(7,), kwargs={}, options={}
        )
    )
    bounces = "SELECT coalesce((headers->>'bounces')::int, 0) FROM pgmq.q_tasker_default"
    wait_for(lambda: (db.execute(bounces).fetchone() or (0,))[0] >= 2, 20, "two bounces")
    row = db.execute("SELECT headers->>'returned', read_ct FROM pgmq.q_tasker_default").fetchone()
    assert row is not None and int(row[0]) == row[1]  # every delivery was given back
    assert db.execute("SELECT count(*) FROM pgmq.q_tasker_default__xq").fetchone() == (0,)

    @dramatiq.actor(actor_name="arrives_later")
    def arrives_later(value: int) -> None:  # the new worker version, deployed
        seen.append(value)

    broker.join("default", timeout=30_000)
    assert seen == [7]


def test_undecodable_payload_is_dead_lettered_and_others_keep_flowing(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    seen: list[str] = []

    @dramatiq.actor
    def fine(value: str) -> None:
        seen.append(value)

    fine.send("before")
    broker.join(fine.queue_name, timeout=10_000)
    db.execute(
        "INSERT INTO pgmq.q_tasker_default (vt, message, headers) VALUES "
        '(now(), \'{"garbage": true}\', \'{"enc": "json"}\')'
    )
    fine.send("after")
    broker.join(fine.queue_name, timeout=10_000)
    assert seen == ["before", "after"]
    error = db.execute("SELECT headers->>'error' FROM pgmq.q_tasker_default__xq").fetchone()
    assert error is not None and "Cannot decode" in error[0]


@pytest.mark.parametrize(
    "payload",
    [
        {"nan": float("nan")},
        {"inf": float("inf"), "neg": float("-inf")},
        {"nul": "a\x00b"},
        {"big": 2**200, "neg_big": -(2**90)},
        {"float": 1e16, "tiny": 1e-7, "negzero": -0.0, "plain": 0.1},
        {"unicode": "żółw 🐢", "surrogate": "\ud800"},
    ],
)
def test_payloads_jsonb_cannot_hold_round_trip_exactly(
    broker: PGMQBroker, worker: dramatiq.Worker, payload: dict[str, Any]
) -> None:
    received: list[dict[str, Any]] = []

    @dramatiq.actor
    def echo(value: dict[str, Any]) -> None:
        received.append(value)

    echo.send(payload)
    broker.join(echo.queue_name, timeout=10_000)
    assert len(received) == 1
    got = received[0]
    assert set(got) == set(payload)
    for key, value in payload.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key])
        else:
            assert got[key] == value and type(got[key]) is type(value)
            if isinstance(value, float):
                assert str(got[key]) == str(value)


def test_unserialisable_payload_fails_with_a_clear_error(broker: PGMQBroker) -> None:
    @dramatiq.actor
    def takes_object(value: object) -> None: ...

    with pytest.raises(ValueError, match="JSON-serialisable"):
        takes_object.send(object())


def test_transactional_enqueue_rolled_back_leaves_no_row_and_no_wakeup(
    broker: PGMQBroker, database_url: str, db: psycopg.Connection[Any]
) -> None:
    @dramatiq.actor
    def in_tx() -> None: ...

    broker.ensure_queue(broker.names(in_tx.queue_name))
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute('LISTEN "pgmq.q_tasker_default.INSERT"')
        with psycopg.connect(database_url) as conn:
            with broker.use_connection(conn):
                in_tx.send()
            conn.rollback()
        assert list(listener.notifies(timeout=0.3)) == []
        assert rows(db, "q_tasker_default") == 0
        with psycopg.connect(database_url) as conn:
            with broker.use_connection(conn):
                in_tx.send()
            assert rows(db, "q_tasker_default") == 0  # not visible before commit
            conn.commit()
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1
    assert rows(db, "q_tasker_default") == 1


def test_enqueue_batch_is_one_transaction(broker: PGMQBroker, worker: dramatiq.Worker) -> None:
    seen: list[int] = []

    @dramatiq.actor
    def item(i: int) -> None:
        seen.append(i)

    broker.enqueue_batch([item.message(i) for i in range(30)])
    broker.join(item.queue_name, timeout=10_000)
    assert sorted(seen) == list(range(30))


def test_join_times_out_and_unknown_queue_is_rejected(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="nobody_consumes")
    def waiting() -> None: ...

    waiting.send()
    with pytest.raises(QueueJoinTimeout):
        broker.join("nobody_consumes", timeout=300)
    with pytest.raises(QueueNotFound):
        broker.join("never_declared", timeout=100)
    broker.flush("nobody_consumes")
    broker.join("nobody_consumes", timeout=1_000)


def test_flush_all_while_consumers_run(broker: PGMQBroker, worker: dramatiq.Worker) -> None:
    @dramatiq.actor(queue_name="slowq")
    def slow() -> None:
        time.sleep(0.05)

    for _ in range(40):
        slow.send()
    time.sleep(0.1)
    started = time.monotonic()
    broker.flush_all()
    assert time.monotonic() - started < 2
    broker.join("slowq", timeout=5_000)


def test_queue_names_are_mapped_and_notify_fires(
    broker: PGMQBroker, worker: dramatiq.Worker, db: psycopg.Connection[Any]
) -> None:
    seen: list[str] = []
    names = ["Upper.Case-Queue", "x" * 100]
    for name in names:

        @dramatiq.actor(queue_name=name, actor_name=f"actor_{len(name)}")
        def handler(value: str) -> None:
            seen.append(value)

        handler.send(name)
    for name in names:
        broker.join(name, timeout=10_000)
    assert sorted(seen) == sorted(names)
    tables = {row[0] for row in db.execute("SELECT queue_name FROM pgmq.meta").fetchall()}
    for name in names:
        main = broker.names(name).main
        assert main in tables and main == main.lower() and len(main) + 4 <= 47


def test_invalid_names_are_refused_at_declaration(broker: PGMQBroker) -> None:
    broker.declare_queue("a_b")
    with pytest.raises(QueueNameError):
        broker.declare_queue("foo bar")
    assert broker.names("a_b").main == "tasker_a_b"


def test_wakeup_latency_is_low_with_listen(broker: PGMQBroker, worker: dramatiq.Worker) -> None:
    started = threading.Event()

    @dramatiq.actor
    def ping() -> None:
        started.set()

    ping.send()  # warm up: queue created, listener connected
    broker.join(ping.queue_name, timeout=5_000)
    latencies = []
    for _ in range(5):
        started.clear()
        time.sleep(0.3)  # consumer is idle, waiting on its wake-up event
        sent = time.monotonic()
        ping.send()
        assert started.wait(2)
        latencies.append(time.monotonic() - sent)
    assert sorted(latencies)[2] < 0.1, latencies


def test_retries_middleware_is_present(broker: PGMQBroker) -> None:
    assert any(isinstance(m, Retries) for m in broker.middleware)


def test_a_consumer_ignores_messages_it_did_not_deliver(
    broker: PGMQBroker, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Dramatiq's broker contract: ack, nack and requeue of a message the consumer did not
    deliver (a plain Message, another broker's proxy) change nothing, as with Dramatiq's RabbitMQ
    and Redis consumers; a requeue skips them and requeues the rest."""

    @dramatiq.actor
    def job() -> None: ...

    job.send()
    consumer = broker.consume(job.queue_name, prefetch=1, timeout=500)
    visible = "SELECT count(*) FROM pgmq.q_tasker_default WHERE vt <= clock_timestamp()"
    try:
        delivery = next(consumer)
        assert isinstance(delivery, PGMQMessageProxy)
        plain = delivery._message
        foreign = MessageProxy(plain)  # the same message, as another broker delivered it
        caplog.set_level(logging.DEBUG, logger="tasker.brokers.consumer")
        for message in (plain, foreign):
            consumer.ack(message)
            consumer.nack(message)
        consumer.requeue([plain, foreign])
        assert rows(db, "q_tasker_default") == 1 and rows(db, "q_tasker_default__xq") == 0
        assert db.execute(visible).fetchone() == (0,)  # still leased to its delivery
        assert broker.leases.count("tasker_default") == 1
        ignored = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert sum("PGMQ did not deliver" in text for text in ignored) == 6

        consumer.requeue([foreign, delivery, plain])  # the delivery is requeued, the rest skipped
        assert db.execute(visible).fetchone() == (1,)
        assert broker.leases.count("tasker_default") == 0
        again = next(consumer)
        assert isinstance(again, PGMQMessageProxy) and again.msg_id == delivery.msg_id
        consumer.ack(again)
        assert rows(db, "q_tasker_default") == 0
    finally:
        consumer.close()

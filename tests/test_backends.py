"""The Postgres result and rate-limiter backends against a real PostgreSQL.

Expiry is tested without sleeping: a TTL of 0 ms is already expired when read, and live rows are
aged by moving ``expires_at`` into the past.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from dramatiq.encoder import PickleEncoder
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits import Barrier, ConcurrentRateLimiter, WindowRateLimiter
from dramatiq.results import ResultFailure, ResultMissing, Results, ResultTimeout
from psycopg import sql
from psycopg_pool import ConnectionPool

from tasker.backends import PostgresRateLimiterBackend, PostgresResultBackend
from tasker.db.connection import make_pool
from tasker.exceptions import ConfigurationError

DB = psycopg.Connection[tuple[Any, ...]]
HOUR_MS = 3_600_000


@pytest.fixture
def results(database_url: str) -> Iterator[PostgresResultBackend]:
    backend = PostgresResultBackend(url=database_url)
    yield backend
    backend.close()


@pytest.fixture
def limits(database_url: str) -> Iterator[PostgresRateLimiterBackend]:
    backend = PostgresRateLimiterBackend(url=database_url)
    yield backend
    backend.close()


def make_message(actor_name: str = "compute") -> Message[Any]:
    return Message(queue_name="default", actor_name=actor_name, args=(), kwargs={}, options={})


def expire_all(db: DB, table: str) -> None:
    """Age every row of ``table`` past its expiry."""
    statement = sql.SQL("UPDATE tasker.{} SET expires_at = now() - interval '1 second'")
    db.execute(statement.format(sql.Identifier(table)))


def limit_value(db: DB, key: str) -> int | None:
    row = db.execute(
        "SELECT value FROM tasker.dramatiq_rate_limits WHERE key = %s AND expires_at > now()",
        (key,),
    ).fetchone()
    return None if row is None else int(row[0])


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)


# -- results ---------------------------------------------------------------------------------


def test_stored_result_is_returned_blocking_or_not(results: PostgresResultBackend) -> None:
    message = make_message()
    results.store_result(message, {"answer": [4, 2]}, HOUR_MS)
    assert results.get_result(message) == {"answer": [4, 2]}
    assert results.get_result(message, block=True, timeout=1) == {"answer": [4, 2]}


def test_storing_again_replaces_the_result(results: PostgresResultBackend) -> None:
    message = make_message()
    results.store_result(message, 1, HOUR_MS)
    results.store_result(message, 2, HOUR_MS)
    assert results.get_result(message) == 2


def test_missing_result_raises_missing_or_timeout(results: PostgresResultBackend) -> None:
    message = make_message()
    with pytest.raises(ResultMissing):
        results.get_result(message)
    with pytest.raises(ResultTimeout):
        results.get_result(message, block=True, timeout=50)


def test_expired_result_is_missing(results: PostgresResultBackend, db: DB) -> None:
    instant, aged = make_message(), make_message()
    results.store_result(instant, "gone", 0)
    results.store_result(aged, "aged", HOUR_MS)
    assert results.get_result(aged) == "aged"
    expire_all(db, "dramatiq_results")
    for message in (instant, aged):
        with pytest.raises(ResultMissing):
            results.get_result(message)


def test_blocking_get_sees_a_result_stored_later(results: PostgresResultBackend) -> None:
    message = make_message()
    storer = threading.Timer(0.1, results.store_result, args=(message, "late", HOUR_MS))
    storer.start()
    try:
        assert results.get_result(message, block=True, timeout=10_000) == "late"
    finally:
        storer.join()


def test_stored_exception_is_raised_as_result_failure(results: PostgresResultBackend) -> None:
    message = make_message()
    results.store_exception(message, ValueError("bad input"), HOUR_MS)
    with pytest.raises(ResultFailure) as failure:
        results.get_result(message)
    assert failure.value.orig_exc_type == "ValueError"
    assert failure.value.orig_exc_msg == "bad input"


def test_custom_encoder_and_readable_keys(database_url: str, db: DB) -> None:
    backend = PostgresResultBackend(
        url=database_url, encoder=PickleEncoder(), use_namespace_prefix_keys=True
    )
    message = make_message()
    try:
        backend.store_result(message, {1, 2, 3}, HOUR_MS)
        assert backend.get_result(message) == {1, 2, 3}
    finally:
        backend.close()
    key = db.execute("SELECT message_key FROM tasker.dramatiq_results").fetchone()
    assert key == (f"dramatiq-results:default:compute:{message.message_id}",)


def test_expired_results_are_deleted_opportunistically(database_url: str, db: DB) -> None:
    backend = PostgresResultBackend(url=database_url, cleanup_every=2)
    try:
        backend.store_result(make_message(), "expired", 0)
        backend.store_result(make_message(), "kept", HOUR_MS)
    finally:
        backend.close()
    rows = db.execute("SELECT count(*) FROM tasker.dramatiq_results").fetchone()
    assert rows == (1,)


def test_backend_needs_exactly_one_of_url_and_pool(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="url="):
        PostgresResultBackend()
    with pytest.raises(ConfigurationError, match="pool="):
        PostgresRateLimiterBackend(url=database_url, pool=make_pool(database_url))


def test_a_callers_pool_is_used_and_left_open(database_url: str) -> None:
    pool: ConnectionPool[Any] = make_pool(database_url, max_size=2)
    pool.open()
    try:
        backend = PostgresResultBackend(pool=pool)
        message = make_message()
        backend.store_result(message, "pooled", HOUR_MS)
        backend.close()
        assert not pool.closed
        assert backend.get_result(message) == "pooled"
    finally:
        pool.close()


# -- rate limiter operations -----------------------------------------------------------------


def test_add_only_sets_absent_or_expired_keys(limits: PostgresRateLimiterBackend, db: DB) -> None:
    assert limits.add("k", 5, HOUR_MS)
    assert not limits.add("k", 7, HOUR_MS)
    assert limit_value(db, "k") == 5
    expire_all(db, "dramatiq_rate_limits")
    assert limits.add("k", 7, HOUR_MS)
    assert limit_value(db, "k") == 7
    assert limits.add("instant", 1, 0)
    assert limits.add("instant", 2, HOUR_MS)


def test_incr_counts_from_zero_up_to_the_maximum(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    assert limits.incr("k", 2, 3, HOUR_MS)
    assert limits.incr("k", 1, 3, HOUR_MS)
    assert not limits.incr("k", 1, 3, HOUR_MS)
    assert limit_value(db, "k") == 3
    assert not limits.incr("absent", 4, 3, HOUR_MS)
    assert limit_value(db, "absent") is None
    expire_all(db, "dramatiq_rate_limits")
    assert limits.incr("k", 3, 3, HOUR_MS)
    assert limit_value(db, "k") == 3


def test_incr_beyond_maximum_succeeds_from_a_negative_value(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    assert limits.decr("k", 5, -10, HOUR_MS)
    assert limits.incr("k", 4, 1, HOUR_MS)
    assert limit_value(db, "k") == -1


def test_incr_and_decr_refresh_the_ttl(limits: PostgresRateLimiterBackend, db: DB) -> None:
    assert limits.add("k", 1, 0)
    assert limits.incr("k", 1, 10, HOUR_MS)
    assert limit_value(db, "k") == 1  # the expired value counted as 0
    db.execute("UPDATE tasker.dramatiq_rate_limits SET expires_at = now() + interval '1 second'")
    assert limits.decr("k", 1, 0, HOUR_MS)
    row = db.execute(
        "SELECT expires_at > now() + interval '1 minute' FROM tasker.dramatiq_rate_limits"
    ).fetchone()
    assert row == (True,)


def test_decr_stops_at_the_minimum(limits: PostgresRateLimiterBackend, db: DB) -> None:
    assert not limits.decr("absent", 1, 0, HOUR_MS)
    assert limit_value(db, "absent") is None
    assert limits.decr("negative", 2, -2, HOUR_MS)
    assert limit_value(db, "negative") == -2
    assert limits.add("k", 2, HOUR_MS)
    assert limits.decr("k", 1, 1, HOUR_MS)
    assert not limits.decr("k", 1, 1, HOUR_MS)
    assert limit_value(db, "k") == 1
    expire_all(db, "dramatiq_rate_limits")
    assert not limits.decr("k", 1, 0, HOUR_MS)


@pytest.mark.parametrize("as_callable", [True, False])
def test_incr_and_sum_limits_the_key_and_the_sum(
    limits: PostgresRateLimiterBackend, db: DB, as_callable: bool
) -> None:
    window = ["w@3", "w@2", "w@1"]
    keys: Any = (lambda: window) if as_callable else window
    assert limits.add("w@2", 2, HOUR_MS)
    assert limits.add("w@1", 5, 0)  # expired: not part of the sum
    assert limits.incr_and_sum("w@3", keys, 1, 4, HOUR_MS)
    assert limits.incr_and_sum("w@3", keys, 1, 4, HOUR_MS)
    assert not limits.incr_and_sum("w@3", keys, 1, 4, HOUR_MS)
    assert limit_value(db, "w@3") == 2
    assert not limits.incr_and_sum("solo", [], 5, 4, HOUR_MS)
    assert limits.incr_and_sum("solo", [], 4, 4, HOUR_MS)
    assert limit_value(db, "solo") == 4


def test_wait_sees_an_unexpired_notification(limits: PostgresRateLimiterBackend) -> None:
    assert not limits.wait("events", 30)
    limits.wait_notify("expired", 0)
    assert not limits.wait("expired", 30)
    limits.wait_notify("events", HOUR_MS)
    assert limits.wait("events", 30)
    assert limits.wait("events", 30), "a notification is seen by every waiter"


def test_wait_without_timeout_blocks_until_notified(limits: PostgresRateLimiterBackend) -> None:
    notifier = threading.Timer(0.1, limits.wait_notify, args=("events", HOUR_MS))
    notifier.start()
    try:
        assert limits.wait("events", None)
    finally:
        notifier.join()


def test_expired_limits_and_events_are_deleted_opportunistically(database_url: str, db: DB) -> None:
    backend = PostgresRateLimiterBackend(url=database_url, cleanup_every=3)
    try:
        backend.add("gone", 1, 0)
        backend.wait_notify("gone", 0)
        backend.add("kept", 1, HOUR_MS)
    finally:
        backend.close()
    assert db.execute("SELECT key FROM tasker.dramatiq_rate_limits").fetchall() == [("kept",)]
    assert db.execute("SELECT count(*) FROM tasker.dramatiq_rate_limit_events").fetchone() == (0,)


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_incr_never_exceeds_the_maximum(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    successes: list[bool] = []

    def hammer(_: int) -> None:
        outcomes = [limits.incr("k", 1, 60, HOUR_MS) for _ in range(20)]
        successes.extend(outcomes)

    run_threads(8, hammer)
    assert successes.count(True) == 60
    assert limit_value(db, "k") == 60


def test_concurrent_incr_and_sum_never_exceeds_the_maximum(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    window = ["w@0", "w@1", "w@2"]
    successes: list[bool] = []

    def hammer(thread: int) -> None:
        key = window[thread % 3]
        outcomes = [limits.incr_and_sum(key, window, 1, 25, HOUR_MS) for _ in range(10)]
        successes.extend(outcomes)

    run_threads(8, hammer)
    assert successes.count(True) == 25
    assert sum(limit_value(db, key) or 0 for key in window) == 25


# -- dramatiq's rate limiters and barrier ----------------------------------------------------


def test_concurrent_rate_limiter_admits_only_the_limit(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    limiter = ConcurrentRateLimiter(limits, "mutex", limit=3)
    outcomes: list[bool] = []
    everyone_tried = threading.Barrier(8)

    def contend(_: int) -> None:
        with limiter.acquire(raise_on_failure=False) as acquired:
            outcomes.append(acquired)
            everyone_tried.wait(timeout=30)

    run_threads(8, contend)
    assert outcomes.count(True) == 3
    assert limit_value(db, "mutex") == 0
    with limiter.acquire():
        assert limit_value(db, "mutex") == 1


def test_window_rate_limiter_admits_only_the_limit(limits: PostgresRateLimiterBackend) -> None:
    limiter = WindowRateLimiter(limits, "window", limit=3, window=60)
    outcomes = []
    for _ in range(5):
        with limiter.acquire(raise_on_failure=False) as acquired:
            outcomes.append(acquired)
    assert outcomes == [True, True, True, False, False]


def test_barrier_without_blocking(limits: PostgresRateLimiterBackend) -> None:
    barrier = Barrier(limits, "barrier", ttl=HOUR_MS)
    assert barrier.create(parties=3)
    assert not barrier.create(parties=3)
    assert [barrier.wait(block=False) for _ in range(3)] == [False, False, True]


def test_barrier_releases_every_blocked_party(limits: PostgresRateLimiterBackend) -> None:
    barrier = Barrier(limits, "barrier", ttl=HOUR_MS)
    assert barrier.create(parties=3)
    released: list[bool] = []

    def party(_: int) -> None:
        released.append(barrier.wait(block=True, timeout=10_000))

    run_threads(3, party)
    assert released == [True, True, True]


def test_blocked_barrier_party_times_out(limits: PostgresRateLimiterBackend) -> None:
    barrier = Barrier(limits, "barrier", ttl=HOUR_MS)
    assert barrier.create(parties=2)
    assert not barrier.wait(block=True, timeout=50)


# -- with dramatiq's middleware --------------------------------------------------------------


def test_results_and_group_callbacks_through_a_worker(
    results: PostgresResultBackend, limits: PostgresRateLimiterBackend
) -> None:
    broker = StubBroker()
    broker.add_middleware(Results(backend=results))
    broker.add_middleware(GroupCallbacks(limits))
    finished: list[str] = []

    @dramatiq.actor(broker=broker, store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    @dramatiq.actor(broker=broker)
    def done() -> None:
        finished.append("done")

    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        jobs = dramatiq.group([add.message(1, 2), add.message(3, 4)], broker=broker)
        jobs.add_completion_callback(done.message())
        jobs.run()
        assert list(jobs.get_results(block=True, timeout=10_000)) == [3, 7]
        broker.join(add.queue_name)
        worker.join()
    finally:
        worker.stop()
        broker.close()
    assert finished == ["done"]

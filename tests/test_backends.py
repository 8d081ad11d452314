"""The Postgres result and rate-limiter backends against a real PostgreSQL.

Expiry is tested without sleeping: a TTL of 0 ms is already expired when read, and live rows are
aged by moving ``expires_at`` into the past.

Blocking waits are woken by NOTIFY, on one LISTEN connection per backend. The tests that show it
set the fallback check of a listening wait to 10 s (``slow_fallback``) and see the wait return
well before that, and count the wait's reads of the row; they never rely on how fast the machine
is.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
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
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from tasker.backends import PostgresRateLimiterBackend, PostgresResultBackend, _common, _listener
from tasker.backends._common import EVENT_CHANNEL_PREFIX, RESULT_CHANNEL_PREFIX, channel_name
from tasker.backends._listener import Listener
from tasker.db.connection import make_pool
from tasker.exceptions import ConfigurationError
from tests.support import wait_for

DB = psycopg.Connection[tuple[Any, ...]]
HOUR_MS = 3_600_000
#: The fallback check of a listening wait in the tests that show notifications wake it (s).
SLOW_FALLBACK_S = 10.0
#: A bound well under SLOW_FALLBACK_S: a wait that returns within it was not woken by the
#: fallback check, however loaded the machine (s).
WOKEN_WITHIN_S = SLOW_FALLBACK_S / 2
#: Most time between a Barrier's release and its blocked parties' return (s): generous for a
#: loaded machine, and yet far below SLOW_FALLBACK_S.
RELEASE_SPREAD_S = 0.5


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


@pytest.fixture
def slow_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listening waits check on their own only every SLOW_FALLBACK_S seconds."""
    monkeypatch.setattr(_common, "LISTEN_FALLBACK_POLL_S", SLOW_FALLBACK_S)


@pytest.fixture
def retry_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a listener's failure, the next wait tries a new connection at once."""
    monkeypatch.setattr(_listener, "RETRY_INITIAL_S", 0.0)


@pytest.fixture
def never_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a listener's failure, waits poll for the rest of the test."""
    monkeypatch.setattr(_listener, "RETRY_INITIAL_S", float(HOUR_MS))


class Waiter(threading.Thread):
    """Runs ``call`` in a thread and notes what it returned or raised, and when."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.value: Any = None
        self.error: BaseException | None = None
        self.returned_at = 0.0

    def run(self) -> None:
        try:
            self.value = self._call()
        except BaseException as exc:
            self.error = exc
        self.returned_at = time.monotonic()

    def outcome(self, timeout: float = 30.0) -> Any:
        """What ``call`` returned (its exception is raised), waiting up to ``timeout`` s."""
        self.join(timeout)
        assert not self.is_alive(), f"the wait did not return within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value


def listener_of(backend: PostgresResultBackend | PostgresRateLimiterBackend) -> Listener:
    """The listener that ``backend``'s blocked waits share in this process."""
    return backend._db.listener()


def listener_sessions(db: DB) -> dict[int, str]:
    """The sessions of this test's database whose last statement was LISTEN or UNLISTEN (the
    backends' listeners), as ``{pid: last statement}``."""
    rows = db.execute(
        "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND (query LIKE 'LISTEN %' OR query LIKE 'UNLISTEN %')"
    ).fetchall()
    return {int(pid): str(query) for pid, query in rows}


def session_alive(db: DB, pid: int | None) -> bool:
    row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row == (1,)


def count_reads(
    results: PostgresResultBackend, after: Callable[[int], None] | None = None
) -> list[int]:
    """Count ``results``' reads of a result row: the returned list grows by one per read.

    ``after(n)``, when given, runs after the n-th read (from 1), before the wait sees its row.
    """
    reads: list[int] = []
    read = results._get

    def counted(message_key: str) -> Any:
        found = read(message_key)
        reads.append(len(reads) + 1)
        if after is not None:
            after(len(reads))
        return found

    results._get = counted  # type: ignore[method-assign]
    return reads


def unlistenable_pool(database_url: str, size: int = 2) -> ConnectionPool[Any]:
    """An open pool of ``size`` working connections whose new connections all fail, so a
    backend on it cannot open a listening connection (made with the pool's settings)."""
    pool: ConnectionPool[Any] = make_pool(database_url, min_size=size, max_size=size)
    pool.open(wait=True)
    pool.conninfo = make_conninfo(
        **{**conninfo_to_dict(database_url), "dbname": "tasker_no_such_database"}
    )
    return pool


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


@pytest.mark.usefixtures("slow_fallback")
def test_blocked_get_result_is_woken_by_the_notification(
    results: PostgresResultBackend, db: DB
) -> None:
    message = make_message()
    reads = count_reads(results)
    listener = listener_of(results)
    assert not listener.is_running(), "started by the first blocked wait"
    waiter = Waiter(lambda: results.get_result(message, block=True, timeout=60_000))
    waiter.start()
    # Read once before LISTEN and once after: the wait now sleeps until a notification.
    wait_for(lambda: len(reads) >= 2 and listener.listening_waits() == 1, 30, "a listening wait")
    stored_at = time.monotonic()
    results.store_result(message, "pushed", HOUR_MS)
    assert waiter.outcome() == "pushed"
    assert waiter.returned_at - stored_at < WOKEN_WITHIN_S
    assert reads == [1, 2, 3], "one read per notification, none by the fallback check"
    # The connection stays open for later waits, and no longer listens on the key's channel.
    channel = channel_name(RESULT_CHANNEL_PREFIX, results.build_message_key(message))
    unlistened = {listener.backend_pid: f'UNLISTEN "{channel}"'}
    wait_for(lambda: listener_sessions(db) == unlistened, 30, "the channel to be unlistened")
    assert listener.is_running()


@pytest.mark.usefixtures("slow_fallback")
def test_a_result_stored_just_before_listen_is_found(
    results: PostgresResultBackend, db: DB
) -> None:
    message = make_message()

    def store_after_first_read(read: int) -> None:
        if read == 1:  # its NOTIFY is sent before the wait LISTENs
            results.store_result(message, "early", HOUR_MS)

    reads = count_reads(results, store_after_first_read)
    started = time.monotonic()
    assert results.get_result(message, block=True, timeout=60_000) == "early"
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert reads == [1, 2], "found by the read right after LISTEN"


@pytest.mark.usefixtures("slow_fallback")
def test_a_result_stored_while_its_listen_runs_is_found(
    results: PostgresResultBackend,
) -> None:
    """The result is committed by the listener's thread right before it runs the wait's
    LISTEN, so its notification is never received: the read after the LISTEN finds it."""
    message = make_message()
    listener = listener_of(results)
    connect = listener._connect

    def connect_storing_before_listen() -> Any:
        conn = connect()
        execute = conn.execute

        def execute_after_store(query: Any, *args: Any, **kwargs: Any) -> Any:
            if query.as_string(conn).startswith("LISTEN"):
                results.store_result(message, "stored", HOUR_MS)
            return execute(query, *args, **kwargs)

        conn.execute = execute_after_store  # type: ignore[method-assign]
        return conn

    listener._connect = connect_storing_before_listen
    reads = count_reads(results)
    started = time.monotonic()
    assert results.get_result(message, block=True, timeout=60_000) == "stored"
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert reads == [1, 2], "found by the read after LISTEN"


@pytest.mark.usefixtures("slow_fallback")
def test_listening_get_result_times_out_at_its_deadline(results: PostgresResultBackend) -> None:
    started = time.monotonic()
    with pytest.raises(ResultTimeout):
        results.get_result(make_message(), block=True, timeout=300)
    assert 0.3 <= time.monotonic() - started < WOKEN_WITHIN_S


@pytest.mark.usefixtures("never_retry")
def test_get_result_polls_when_it_cannot_listen(
    database_url: str, db: DB, caplog: pytest.LogCaptureFixture
) -> None:
    pool = unlistenable_pool(database_url)
    backend = PostgresResultBackend(pool=pool)
    try:
        message = make_message()
        reads = count_reads(backend)
        with caplog.at_level(logging.WARNING, logger="tasker.backends"):
            with pytest.raises(ResultTimeout):
                backend.get_result(message, block=True, timeout=100)
            waiter = Waiter(lambda: backend.get_result(message, block=True, timeout=60_000))
            waiter.start()
            wait_for(lambda: len(reads) >= 4, 30, "the wait to poll")
            backend.store_result(message, "polled", HOUR_MS)
            assert waiter.outcome() == "polled"
        assert caplog.text.count("cannot LISTEN") == 1, "once per failure, not per wait"
        assert listener_sessions(db) == {}
    finally:
        backend.close()
        pool.close()


@pytest.mark.usefixtures("retry_at_once")
def test_a_listener_that_cannot_connect_warns_once_and_connects_on_a_later_wait(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = unlistenable_pool(database_url)
    backend = PostgresResultBackend(pool=pool)
    listener = listener_of(backend)
    try:
        with caplog.at_level(logging.DEBUG, logger="tasker.backends"):
            for _ in range(3):
                with pytest.raises(ResultTimeout):
                    backend.get_result(make_message(), block=True, timeout=100)
                wait_for(lambda: not listener.is_running(), 30, "the attempt to fail")
            pool.conninfo = database_url  # the server accepts the listener again
            message = make_message()
            waiter = Waiter(lambda: backend.get_result(message, block=True, timeout=60_000))
            waiter.start()
            wait_for(lambda: listener.listening_waits() == 1, 30, "a listening wait")
            backend.store_result(message, "listened", HOUR_MS)
            assert waiter.outcome() == "listened"
    finally:
        backend.close()
        pool.close()
    failures = [r.levelname for r in caplog.records if "cannot LISTEN" in r.getMessage()]
    assert failures == ["WARNING", "DEBUG", "DEBUG"], "one warning per outage, not per attempt"
    assert "LISTEN connection re-established" in caplog.text


@pytest.mark.usefixtures("slow_fallback", "retry_at_once")
def test_waits_poll_when_the_listening_connection_is_lost_and_a_later_wait_listens_again(
    results: PostgresResultBackend, db: DB, caplog: pytest.LogCaptureFixture
) -> None:
    message = make_message()
    reads = count_reads(results)
    listener = listener_of(results)
    with caplog.at_level(logging.WARNING, logger="tasker.backends"):
        waiters = [
            Waiter(lambda: results.get_result(message, block=True, timeout=60_000))
            for _ in range(2)
        ]
        for waiter in waiters:
            waiter.start()
        wait_for(lambda: listener.listening_waits() == 2, 30, "two listening waits")
        lost = listener.backend_pid
        db.execute("SELECT pg_terminate_backend(%s)", (lost,))
        wait_for(lambda: "LISTEN connection lost" in caplog.text, 30, "the loss to be noticed")
        stored_at = time.monotonic()
        results.store_result(message, "polled", HOUR_MS)
        assert [waiter.outcome() for waiter in waiters] == ["polled", "polled"]
        assert max(waiter.returned_at for waiter in waiters) - stored_at < WOKEN_WITHIN_S
        assert caplog.text.count("LISTEN connection lost") == 1, "once per failure, not per wait"

        # A later wait opens a new listening connection and is woken by its notification.
        later = make_message()
        waiter = Waiter(lambda: results.get_result(later, block=True, timeout=60_000))
        waiter.start()
        wait_for(lambda: listener.listening_waits() == 1, 30, "a wait listening again")
        assert listener.backend_pid not in (None, lost)
        read_before_store = len(reads)
        stored_at = time.monotonic()
        results.store_result(later, "pushed", HOUR_MS)
        assert waiter.outcome() == "pushed"
        assert waiter.returned_at - stored_at < WOKEN_WITHIN_S
        assert len(reads) == read_before_store + 1, "woken by the notification"
    assert list(listener_sessions(db)) == [listener.backend_pid]


def test_a_callers_pool_settings_open_the_listening_connection(database_url: str, db: DB) -> None:
    pool: ConnectionPool[Any] = make_pool(database_url, application_name="caller-app")
    pool.open()
    backend = PostgresResultBackend(pool=pool)
    try:
        message = make_message()
        listener = listener_of(backend)
        waiter = Waiter(lambda: backend.get_result(message, block=True, timeout=60_000))
        waiter.start()
        wait_for(lambda: listener.listening_waits() == 1, 30, "a listening wait")
        row = db.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
            (listener.backend_pid,),
        ).fetchone()
        backend.store_result(message, "done", HOUR_MS)
        assert waiter.outcome() == "done"
    finally:
        backend.close()
        pool.close()
    assert row == ("caller-app",)


@pytest.mark.usefixtures("slow_fallback")
def test_concurrent_waits_share_one_listening_connection(
    results: PostgresResultBackend, db: DB
) -> None:
    messages = [make_message() for _ in range(20)]
    listener = listener_of(results)
    waiters = [
        Waiter(lambda message=message: results.get_result(message, block=True, timeout=60_000))
        for message in messages
    ]
    for waiter in waiters:
        waiter.start()
    wait_for(lambda: listener.listening_waits() == 20, 30, "twenty listening waits")
    assert list(listener_sessions(db)) == [listener.backend_pid]
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row is not None and row[0] <= 8 + 1, "the pool's connections and one listener"
    stored_at = time.monotonic()
    for number, message in enumerate(messages):
        results.store_result(message, number, HOUR_MS)
    assert [waiter.outcome() for waiter in waiters] == list(range(20))
    assert max(waiter.returned_at for waiter in waiters) - stored_at < WOKEN_WITHIN_S
    assert list(listener_sessions(db)) == [listener.backend_pid]


@pytest.mark.usefixtures("slow_fallback")
def test_a_store_racing_the_registration_is_never_missed(
    results: PostgresResultBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wait's result is stored right after the wait registers on its channel: in the
    waiting thread (before its LISTEN has run, most of the time) or by another thread (racing
    the LISTEN and the read after it). A missed notification would cost a 10 s fallback."""
    listener = listener_of(results)
    subscribe = listener.subscribe
    racing: list[tuple[Message[Any], int]] = []
    storers: list[threading.Thread] = []

    def subscribe_then_store(channel: str) -> Any:
        subscription = subscribe(channel)
        if racing:
            message, number = racing.pop()
            if number % 2:
                results.store_result(message, number, HOUR_MS)
            else:
                storer = threading.Thread(
                    target=results.store_result, args=(message, number, HOUR_MS)
                )
                storer.start()
                storers.append(storer)
        return subscription

    monkeypatch.setattr(listener, "subscribe", subscribe_then_store)
    try:
        for number in range(300):
            message = make_message()
            with pytest.raises(ResultTimeout):  # registers and leaves, maybe before LISTEN ran
                results.get_result(message, block=True, timeout=2)
            racing.append((message, number))
            started = time.monotonic()
            assert results.get_result(message, block=True, timeout=60_000) == number
            assert time.monotonic() - started < WOKEN_WITHIN_S, f"wait {number} missed it"
    finally:
        for storer in storers:
            storer.join(30)
    assert listener.listening_waits() == 0


def test_close_stops_the_listener_and_a_later_wait_starts_it_again(
    database_url: str, db: DB
) -> None:
    backend = PostgresResultBackend(url=database_url)
    try:
        listener = listener_of(backend)
        with pytest.raises(ResultTimeout):
            backend.get_result(make_message(), block=True, timeout=50)
        assert listener.is_running(), "kept after the wait"
        threads = [t for t in threading.enumerate() if t.name == "tasker-results-listener"]
        assert len(threads) == 1
        first = listener.backend_pid
        assert session_alive(db, first)

        # A wait blocked when the backend closes polls for the rest of its wait.
        message = make_message()
        waiter = Waiter(lambda: backend.get_result(message, block=True, timeout=60_000))
        waiter.start()
        wait_for(lambda: listener.listening_waits() == 1, 30, "a listening wait")
        backend.close()
        assert not threads[0].is_alive(), "close() ends the thread"
        assert not listener.is_running()
        wait_for(lambda: not session_alive(db, first), 30, "the listening session to end")
        backend.store_result(message, "polled", HOUR_MS)
        assert waiter.outcome() == "polled"

        later = make_message()
        waiter = Waiter(lambda: backend.get_result(later, block=True, timeout=60_000))
        waiter.start()
        wait_for(lambda: listener.listening_waits() == 1, 30, "a wait listening again")
        assert listener.backend_pid not in (None, first)
        backend.store_result(later, "pushed", HOUR_MS)
        assert waiter.outcome() == "pushed"
    finally:
        backend.close()
    assert not listener.is_running()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.usefixtures("slow_fallback")
def test_a_forked_child_listens_on_its_own_connection(
    results: PostgresResultBackend, db: DB
) -> None:
    listener = listener_of(results)
    with pytest.raises(ResultTimeout):
        results.get_result(make_message(), block=True, timeout=50)
    parents = listener.backend_pid
    message = make_message()
    context = multiprocessing.get_context("fork")
    reports, child_end = context.Pipe(duplex=False)

    def child() -> None:
        try:
            own = listener_of(results)
            waiter = Waiter(lambda: results.get_result(message, block=True, timeout=60_000))
            waiter.start()
            wait_for(lambda: own.listening_waits() == 1, 20, "the child's wait to listen")
            child_end.send(("listening", own is listener, own.backend_pid))
            child_end.send(("woken", waiter.outcome()))
            results.close()  # the child's pool and listener, never the parent's
        except BaseException as exc:
            child_end.send(("failed", repr(exc)))

    process = context.Process(target=child, daemon=True)
    process.start()
    try:
        assert reports.poll(30), "the child did not report"
        kind, same, childs = reports.recv()
        assert (kind, same) == ("listening", False), (kind, same, childs)
        assert childs != parents and session_alive(db, childs)
        stored_at = time.monotonic()
        results.store_result(message, "for the child", HOUR_MS)
        assert reports.poll(30), "the child did not report"
        assert reports.recv() == ("woken", "for the child")
        assert time.monotonic() - stored_at < WOKEN_WITHIN_S
        process.join(30)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(30)

    # The parent's listener was neither used nor closed by the child.
    assert listener.backend_pid == parents and session_alive(db, parents)
    again = make_message()
    waiter = Waiter(lambda: results.get_result(again, block=True, timeout=60_000))
    waiter.start()
    wait_for(lambda: listener.listening_waits() == 1, 30, "the parent's wait to listen")
    stored_at = time.monotonic()
    results.store_result(again, "for the parent", HOUR_MS)
    assert waiter.outcome() == "for the parent"
    assert waiter.returned_at - stored_at < WOKEN_WITHIN_S
    assert listener.backend_pid == parents


def assert_notified(db: DB, channel: str, write: Callable[[], None]) -> None:
    """``write`` sends one NOTIFY, with an empty payload, on ``channel``."""
    assert len(channel.encode()) <= 63, "a channel name is an identifier"
    db.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    write()
    notes = list(db.notifies(timeout=30, stop_after=1))
    assert [(note.channel, note.payload) for note in notes] == [(channel, "")]


def test_a_stored_result_notifies_the_channel_its_waits_listen_on(
    database_url: str, db: DB
) -> None:
    backend = PostgresResultBackend(
        url=database_url, namespace="résultats-ü", use_namespace_prefix_keys=True
    )
    message = make_message()
    key = backend.build_message_key(message)
    try:
        channel = channel_name(RESULT_CHANNEL_PREFIX, key)
        assert_notified(db, channel, lambda: backend.store_result(message, "stored", HOUR_MS))
    finally:
        backend.close()


def test_an_event_notifies_the_channel_its_waits_listen_on(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    key = "barrière-" + "x" * 200 + "@events"  # longer than any channel name
    channel = channel_name(EVENT_CHANNEL_PREFIX, key)
    assert_notified(db, channel, lambda: limits.wait_notify(key, HOUR_MS))


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


@pytest.mark.usefixtures("slow_fallback")
def test_blocked_barrier_parties_are_released_together(
    limits: PostgresRateLimiterBackend, db: DB
) -> None:
    barrier = Barrier(limits, "barrier", ttl=HOUR_MS)
    assert barrier.create(parties=3)
    blocked = [Waiter(lambda: barrier.wait(block=True, timeout=60_000)) for _ in range(2)]
    for party in blocked:
        party.start()
    listener = listener_of(limits)
    wait_for(lambda: listener.listening_waits() == 2, 30, "two listening parties")
    assert list(listener_sessions(db)) == [listener.backend_pid], "one connection for both"
    assert barrier.wait(block=True, timeout=60_000)  # the last party releases the barrier
    returns = [time.monotonic()]
    assert [party.outcome() for party in blocked] == [True, True]
    returns += [party.returned_at for party in blocked]
    assert max(returns) - min(returns) < RELEASE_SPREAD_S, "woken by the notification"


@pytest.mark.usefixtures("slow_fallback")
def test_listening_barrier_party_times_out_at_its_deadline(
    limits: PostgresRateLimiterBackend,
) -> None:
    barrier = Barrier(limits, "barrier", ttl=HOUR_MS)
    assert barrier.create(parties=2)
    started = time.monotonic()
    assert not barrier.wait(block=True, timeout=300)
    assert 0.3 <= time.monotonic() - started < WOKEN_WITHIN_S


@pytest.mark.usefixtures("never_retry")
def test_barrier_parties_are_released_when_they_cannot_listen(
    database_url: str, db: DB, caplog: pytest.LogCaptureFixture
) -> None:
    pool = unlistenable_pool(database_url, size=4)
    backend = PostgresRateLimiterBackend(pool=pool)
    try:
        lonely = Barrier(backend, "lonely", ttl=HOUR_MS)
        barrier = Barrier(backend, "barrier", ttl=HOUR_MS)
        assert lonely.create(parties=2) and barrier.create(parties=2)
        with caplog.at_level(logging.WARNING, logger="tasker.backends"):
            assert not lonely.wait(block=True, timeout=100)
            party = Waiter(lambda: barrier.wait(block=True, timeout=60_000))
            party.start()
            wait_for(lambda: limit_value(db, "barrier") == 1, 30, "the party to wait")
            assert barrier.wait(block=True, timeout=60_000)  # the last party releases it
            assert party.outcome() is True
        assert caplog.text.count("cannot LISTEN") == 1, "once per failure, not per wait"
        assert listener_sessions(db) == {}
    finally:
        backend.close()
        pool.close()


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

"""Connection trouble is survived or reported clearly, and every error is a TaskerError."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg
import pytest

import tasker
import tasker.backends.results
import tasker.brokers.errors
import tasker.exceptions
from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.status import TaskStatus
from tasker.workflow.states import check_task_path
from tests.shapes import LINEAR, Recorder, build_flow
from tests.support import scalar

UNREACHABLE = "postgresql://tasker:s3cret@127.0.0.1:1/nowhere"  # nothing listens on port 1


def terminate_tasker_sessions(url: str) -> int:
    """Terminate Tasker's sessions and wait until they are gone (the next use finds them dead)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'tasker%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def producer(database_url: str) -> Iterator[PGMQBroker]:
    broker = PGMQBroker(url=database_url)
    dramatiq.set_broker(broker)
    yield broker
    broker.close()


def test_sends_and_submits_survive_terminated_pooled_connections(
    producer: PGMQBroker, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    @dramatiq.actor(broker=producer, queue_name="default")
    def noop(n: int) -> None: ...

    client = tasker.Client(broker=producer)
    client.register(build_flow("trouble", LINEAR, Recorder()))
    with producer.pool.connection(), producer.pool.connection():
        pass  # more than one idle connection in the pool
    for round_ in range(3):  # every pooled connection dies while idle, again and again
        assert terminate_tasker_sessions(database_url) >= 1
        noop.send(round_)  # no exception: the dead connections are replaced before use
        assert terminate_tasker_sessions(database_url) >= 1
        client.submit("shapes", "trouble", {"round": round_})
        assert terminate_tasker_sessions(database_url) >= 1
        assert client.status(client.submit("shapes", "trouble", {"round": round_}).task_uuid)
    assert scalar(database_url, "SELECT count(*) FROM pgmq.q_tasker_default") == 3
    assert scalar(database_url, "SELECT count(*) FROM tasker.tasks") == 6  # two per round
    repeated = [r for r in caplog.records if r.name.startswith("tasker") and "once" in r.message]
    assert repeated == []  # the pool's check replaced them: no operation had to be repeated


def test_a_submit_repeated_after_a_lost_connection_creates_one_task(
    producer: PGMQBroker, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try commits but its answer is lost: the repeat finds the task (even for an
    always_unique template, whose identity would otherwise be new on every call)."""
    from tasker import client as client_module

    unique = tasker.Workflow("shapes", "uniq", identity_strategy="always_unique", register=False)
    unique.step("only")(lambda ctx: None)
    client = tasker.Client(broker=producer)
    client.register(unique)
    real = client_module.create_task
    calls: list[bool] = []

    def commit_then_lose_the_answer(conn: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real(conn, *args, **kwargs)
        calls.append(handle.created)
        if len(calls) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return handle

    monkeypatch.setattr(client_module, "create_task", commit_then_lose_the_answer)
    handle = client.submit("shapes", "uniq", {"x": 1})
    assert calls == [True, False]
    assert scalar(database_url, "SELECT count(*) FROM tasker.tasks") == 1
    assert client.status(handle.task_uuid).state == "steps_in_process"


def test_an_unreachable_database_fails_within_the_client_timeout() -> None:
    client = tasker.Client(url=UNREACHABLE, timeout_s=1)
    try:
        for call in (
            lambda: client.submit("shapes", "any", {}),
            lambda: client.status("00000000-0000-0000-0000-000000000000"),
            lambda: client.wait("00000000-0000-0000-0000-000000000000", timeout=30),
        ):
            started = time.monotonic()
            with pytest.raises(tasker.DatabaseUnavailableError) as caught:
                call()
            assert time.monotonic() - started < 4  # one timeout (1 s), not psycopg_pool's 30 s
            message = str(caught.value)
            assert "TASKER_DATABASE__URL" in message and "127.0.0.1:1/nowhere" in message
            assert "s3cret" not in message
    finally:
        client.close()


def test_the_default_client_timeout_is_five_seconds() -> None:
    assert tasker.load_settings("test").database.timeout_s == 5
    client = tasker.Client(url=UNREACHABLE)
    started = time.monotonic()
    try:
        with pytest.raises(tasker.DatabaseUnavailableError, match="within 5s"):
            client.status("00000000-0000-0000-0000-000000000000")
    finally:
        client.close()
    assert 4 < time.monotonic() - started < 9


def test_sending_to_an_unreachable_database_is_a_tasker_error_dramatiq_retries() -> None:
    broker = PGMQBroker(url=UNREACHABLE, timeout_s=1)
    try:
        broker.declare_queue("default")
        message = dramatiq.Message(
            queue_name="default", actor_name="a", args=(), kwargs={}, options={}
        )
        started = time.monotonic()
        with pytest.raises(tasker.DatabaseUnavailableError) as caught:
            broker.enqueue(message)
        assert isinstance(caught.value, dramatiq.errors.ConnectionClosed)
        assert time.monotonic() - started < 4
    finally:
        broker.close()


def test_an_unmigrated_database_says_to_migrate(empty_database_url: str) -> None:
    client = tasker.Client(url=empty_database_url)
    try:
        with pytest.raises(tasker.MigrationError, match="tasker db migrate"):
            client.submit("shapes", "any", {})
    finally:
        client.close()


def _exception_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    raised_by_handlers = (tasker.RetryableError, tasker.PermanentError)  # users raise these
    for module in (tasker, tasker.exceptions, tasker.brokers.errors, tasker.backends.results):
        for _, value in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(value, BaseException)
                and not issubclass(value, Warning)  # issued with warnings.warn, not raised
                and value.__module__.startswith("tasker")
                and value not in raised_by_handlers
            ):
                found.append(value)
    return found


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda c: c.__name__)
def test_every_exception_class_is_a_tasker_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, tasker.TaskerError)


def test_errors_raised_on_bad_input_are_tasker_errors(producer: PGMQBroker) -> None:
    checks: list[Any] = [
        PGMQBroker,
        lambda: PGMQBroker(url="postgresql://x", visibility_timeout_ms=10),
        lambda: tasker.BackoffPolicy(multiplier=0.5),
        lambda: tasker.Workflow("Bad Name", "x"),
        lambda: check_task_path("complete", "pending"),
        lambda: TaskStatus("t", "complete", "n", "w", "1", {}, None, None, "c", 0, ()).step("x"),  # type: ignore[arg-type]
        lambda: producer.names("undeclared"),
    ]
    for check in checks:
        with pytest.raises(tasker.TaskerError):
            check()


def test_a_pool_whose_sessions_all_died_serves_the_next_call_at_once(
    producer: PGMQBroker, database_url: str
) -> None:
    """psycopg_pool's own check sleeps 0, 1, 2, 4 s... after each dead connection it meets;
    after a restart that killed every pooled session, callers timed out for minutes."""
    client = tasker.Client(broker=producer)
    client.register(build_flow("pool", LINEAR, Recorder()))
    for round_ in range(15):
        with producer.pool.connection(), producer.pool.connection(), producer.pool.connection():
            pass  # three idle sessions in the pool, about to die together
        terminate_tasker_sessions(database_url)
        client.submit("shapes", "pool", {"round": round_})  # no PoolTimeout
    assert scalar(database_url, "SELECT count(*) FROM tasker.tasks") == 15

"""Crash, shutdown and connection-loss behaviour of PGMQBroker with real worker subprocesses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dramatiq.errors import ConnectionClosed

from tasker.brokers.pgmq import PGMQBroker
from tests.private_postgres import PrivatePostgres
from tests.support import WorkerProcess, scalar, send_work, wait_for
from tests.workers.actors import SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture
def workers(app_db: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _worker(
    workers: list[WorkerProcess], url: str, tmp_path: Path, **settings: Any
) -> WorkerProcess:
    worker = WorkerProcess(url, tmp_path / f"worker{len(workers)}.log", **settings)
    workers.append(worker)
    return worker


def count(url: str, table: str, where: str = "true") -> int:
    return int(scalar(url, f"SELECT count(*) FROM {table} WHERE {where}"))


def test_sigkilled_worker_message_is_processed_by_another_after_the_lease(
    app_db: str, producer: PGMQBroker, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    lease = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 3000}
    first = _worker(workers, app_db, tmp_path, **lease).start()
    send_work(producer, "k1", sleep_s=1.5)
    wait_for(lambda: count(app_db, "test_exec_log", "kind='start'") == 1, 30, "first start")
    first.kill()
    killed_at = time.monotonic()
    second = _worker(workers, app_db, tmp_path, **lease).start()
    wait_for(lambda: count(app_db, "test_ledger") == 1, 30, "the effect", interval=0.1)
    redelivered_after = time.monotonic() - killed_at
    producer.join("default", timeout=10_000)
    with psycopg.connect(app_db) as conn:
        starts = conn.execute(
            "SELECT read_ct FROM test_exec_log WHERE kind='start' ORDER BY id"
        ).fetchall()
    assert starts == [(1,), (2,)], second.log()
    assert count(app_db, "test_ledger") == 1
    assert redelivered_after > 0.5  # waited for the dead worker's lease, not instant


def test_graceful_shutdown_requeues_prefetched_messages_at_once(
    app_db: str, producer: PGMQBroker, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    slow_lease = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 120_000, "dramatiq_queue_prefetch": 8}
    first = _worker(workers, app_db, tmp_path, **slow_lease).start(threads=1)
    for i in range(8):
        send_work(producer, f"g{i}", sleep_s=0.5)
    wait_for(lambda: count(app_db, "test_exec_log", "kind='start'") >= 1, 30, "first start")
    wait_for(
        lambda: scalar(app_db, "SELECT count(*) FROM pgmq.q_tasker_default WHERE read_ct > 0") >= 4,
        10,
        "prefetch",
    )
    assert first.terminate() == 0
    finished = count(app_db, "test_ledger")
    leased = scalar(app_db, "SELECT count(*) FROM pgmq.q_tasker_default WHERE vt > now()")
    assert leased == 0, "requeued messages must be visible at once, not after the 120 s lease"
    assert count(app_db, "test_exec_log", "kind='start'") == finished  # nothing was cut off
    _worker(workers, app_db, tmp_path, **slow_lease).start(threads=4)
    wait_for(lambda: count(app_db, "test_ledger") == 8, 30, "all eight effects")
    assert count(app_db, "test_exec_log", "kind='start'") == 8  # each ran exactly once


@pytest.mark.timeout(300)  # its own bounded waits add up to 180 s
def test_poison_message_is_dead_lettered_and_others_keep_flowing(
    app_db: str, producer: PGMQBroker, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 1000, "TASKER_BROKER__MAX_DELIVERIES": 2}
    send_work(producer, "poison", actor="die")
    send_work(producer, "healthy")
    worker = _worker(workers, app_db, tmp_path, **settings).start(threads=1)
    childless_since: float | None = None

    def dead_lettered() -> bool:
        # Under `dramatiq tasker.actors` the whole worker exits when the poison message kills its
        # process: start it again, as the container runtime would, until the message is gone.
        # A parent left running without its worker process (it missed the child's death) is
        # replaced too, once it has been childless for 5 s (a booting parent has no child yet).
        nonlocal worker, childless_since
        if worker.alive_without_children():
            childless_since = childless_since or time.monotonic()
            if time.monotonic() - childless_since > 5:
                worker.kill()
        else:
            childless_since = None
        if worker.proc is not None and worker.proc.poll() is not None:
            worker = _worker(workers, app_db, tmp_path, **settings).start(threads=1)
            childless_since = None
        return count(app_db, "pgmq.q_tasker_default__xq") == 1

    wait_for(dead_lettered, 120, "the poison message to be dead-lettered", interval=0.2)
    wait_for(lambda: count(app_db, "test_ledger", "key='healthy'") == 1, 60, "healthy message")
    assert count(app_db, "pgmq.q_tasker_default__xq") == 1
    error = scalar(app_db, "SELECT headers->>'error' FROM pgmq.q_tasker_default__xq")
    assert "max_deliveries=2" in error
    assert count(app_db, "test_exec_log", "key='poison'") == 2


def test_terminated_backends_are_survived_and_nothing_is_lost(
    app_db: str, producer: PGMQBroker, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 2000}
    _worker(workers, app_db, tmp_path, **settings).start(threads=4)
    sent = _send_while(producer, 120, lambda: _terminate_worker_backends(app_db))
    wait_for(lambda: count(app_db, "test_ledger") == len(sent), 60, "every sent message")
    producer.join("default", timeout=30_000)
    assert count(app_db, "pgmq.q_tasker_default__xq") == 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load_loses_nothing(
    private_database_url: str,
    private_postgres: PrivatePostgres,
    workers: list[WorkerProcess],
    tmp_path: Path,
    mode: str,
) -> None:
    with psycopg.connect(private_database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    settings = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 2000}
    _worker(workers, private_database_url, tmp_path, **settings).start(threads=4)
    producer = PGMQBroker(url=private_database_url)
    try:
        sent = _send_while(producer, 150, lambda: private_postgres.restart(mode))  # type: ignore[arg-type]
    finally:
        producer.close()
    url = private_database_url
    wait_for(lambda: _ledger_count(url) == len(sent), 90, "every acknowledged message")
    assert _ledger_keys(url) == set(sent)


def _send_while(producer: PGMQBroker, total: int, fault: Any) -> list[str]:
    """Send ``total`` messages; run ``fault`` once in the middle; return the acknowledged keys."""
    sent: list[str] = []
    fault_thread = None
    for i in range(total):
        if i == total // 3:
            fault_thread = threading.Thread(target=fault)
            fault_thread.start()
        key = f"m{i}"
        for _attempt in range(100):
            try:
                send_work(producer, key, sleep_s=0.01)
                sent.append(key)
                break
            except (ConnectionClosed, psycopg.OperationalError):
                time.sleep(0.1)
        time.sleep(0.01)
    assert fault_thread is not None
    fault_thread.join(timeout=60)
    return sent


def _terminate_worker_backends(url: str) -> None:
    for _ in range(3):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name LIKE 'tasker%%'"
            )
        time.sleep(0.3)


def _ledger_count(url: str) -> int:
    try:
        return count(url, "test_ledger")
    except psycopg.OperationalError:
        return -1


def _ledger_keys(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM test_ledger")}

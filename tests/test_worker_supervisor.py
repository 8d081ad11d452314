"""`tasker worker` supervises its worker processes: restarts, orphan protection, signals.

Every test runs the real command (`python -m tasker.cli worker tests.workers.dying`) in its own
process group, which the test kills at the end whatever happened. Tests wait on conditions (log
lines, /proc, SQL) with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasker.brokers.pgmq import PGMQBroker
from tasker.db.migrate import migrate
from tasker.runtime.supervisor import Backoff
from tasker.runtime.worker_process import EXIT_CONFIG
from tests.support import ROOT, scalar, send_work, wait_for

pytestmark = pytest.mark.slow

MODULE = "tests.workers.dying"
SHORT_LEASE = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 2000}
LONG_LEASE = {"TASKER_BROKER__VISIBILITY_TIMEOUT_MS": 120_000}
LEASED = "SELECT count(*) FROM pgmq.q_tasker_default WHERE vt > now()"
READY = re.compile(r"Worker process \d+ is ready \(pid (\d+)\)")


def _environment(database_url: str, settings: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ, TASKER_ENV="test", TASKER_DATABASE__URL=database_url)
    env["PYTHONPATH"] = str(ROOT)
    env.update({key: str(value) for key, value in settings.items()})
    return env


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, from /proc; None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for its new parent counts as gone)."""
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


def children_of(parent: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``parent``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == parent and stat[0] != "Z":
                found.add(int(entry.name))
    return found


class TaskerWorker:
    """`tasker worker tests.workers.dying ...` in its own process group, logging to a file."""

    def __init__(
        self, database_url: str, log_path: Path, module: str = MODULE, **settings: Any
    ) -> None:
        self.module = module
        self.env = _environment(database_url, settings)
        # The supervisor's private directory goes in the test's directory, so a supervisor the
        # test SIGKILLs (which leaves it behind) leaves nothing in the system's /tmp.
        self.env["TMPDIR"] = str(log_path.parent)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> TaskerWorker:
        command = [sys.executable, "-m", "tasker.cli", "worker", self.module, *options]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_children(self) -> set[int]:
        """Worker processes that are running and said they are ready."""
        ready = {int(pid) for pid in READY.findall(self.log())}
        return ready & children_of(self.pid)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_for``, with this worker's log in the failure message."""
        try:
            wait_for(predicate, timeout, what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.log()}") from None

    def wait_ready(self, processes: int, timeout: float = 60) -> set[int]:
        self.wait(lambda: len(self.ready_children()) == processes, timeout, "ready processes")
        return self.ready_children()

    def send(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        """SIGKILL the process group (the command and any child it left), then reap."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def launch(app_db: str, tmp_path: Path) -> Iterator[Any]:
    """``launch(*options, module=..., **settings)`` starts a `tasker worker` (settings are
    environment variables); every one is killed at the end."""
    started: list[TaskerWorker] = []

    def start(*options: str, module: str = MODULE, **settings: Any) -> TaskerWorker:
        log_path = tmp_path / f"worker{len(started)}.log"
        worker = TaskerWorker(app_db, log_path, module, **settings)
        started.append(worker)
        return worker.start(*options)

    yield start
    for worker in started:
        worker.cleanup()


def count(url: str, table: str, where: str = "true") -> int:
    return int(scalar(url, f"SELECT count(*) FROM {table} WHERE {where}"))


def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


# -- restarts ------------------------------------------------------------------------------------


def test_handler_exiting_its_process_is_restarted_and_the_message_runs_once(
    app_db: str, producer: PGMQBroker, launch: Any
) -> None:
    worker = launch("-p", "1", "-t", "1", **SHORT_LEASE)
    first = worker.wait_ready(1)
    send_work(producer, "once", actor="die_once")
    worker.wait(lambda: count(app_db, "test_ledger") == 1, 60, "the second run")
    producer.join("default", timeout=30_000)
    assert worker.running(), worker.log()  # the same `tasker worker` process, never restarted
    replacement = worker.wait_ready(1)
    assert replacement.isdisjoint(first)
    starts = rows(app_db, "SELECT read_ct, pid FROM test_exec_log WHERE kind='start' ORDER BY id")
    assert [read_ct for read_ct, _ in starts] == [1, 2]  # the second delivery, after the lease
    assert starts[0][1] in first and starts[1][1] in replacement
    assert count(app_db, "test_exec_log", "kind='end'") == 1  # succeeded exactly once
    assert count(app_db, "pgmq.q_tasker_default__xq") == 0
    assert "exited with exit code 1; restarting in 0.5 s" in worker.log()


def test_sigkilled_worker_process_is_replaced_and_the_others_keep_running(
    app_db: str, producer: PGMQBroker, launch: Any
) -> None:
    worker = launch("-p", "2", "-t", "1", **SHORT_LEASE)
    before = worker.wait_ready(2)
    victim, survivor = sorted(before)
    os.kill(victim, signal.SIGKILL)  # the OOM killer's way
    worker.wait(lambda: len(worker.ready_children() - before) == 1, 60, "a replacement")
    assert worker.running()
    assert survivor in worker.ready_children()
    assert re.search(rf"\(pid {victim}\) was killed by SIGKILL; restarting in", worker.log())
    send_work(producer, "after")
    worker.wait(lambda: count(app_db, "test_ledger") == 1, 30, "work after the restart")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.log()


def test_worker_process_that_keeps_dying_is_restarted_with_growing_delays(launch: Any) -> None:
    worker = launch("-p", "1", TEST_WORKER_EXIT_AT_BOOT=1)
    delays_re = re.compile(r"exited with exit code 1; restarting in ([\d.]+) s")
    worker.wait(lambda: len(delays_re.findall(worker.log())) >= 4, 90, "four restarts")
    assert worker.running()
    delays = [float(d) for d in delays_re.findall(worker.log())[:4]]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    started = _times(worker.log(), "Started worker process 0")
    gaps = [later - earlier for earlier, later in itertools.pairwise(started)]
    assert len(gaps) >= 3  # the first start and three restarts
    for gap, delay in zip(gaps, delays, strict=False):
        assert gap >= delay - 0.01  # each restart waited at least its delay (no upper bound)


def test_backoff_doubles_up_to_its_maximum_and_resets_after_a_long_run() -> None:
    backoff = Backoff()
    delays = [backoff.delay(ran_for_s=1) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(ran_for_s=60) == 0.5  # it had run for a minute: a fresh start
    assert backoff.delay(ran_for_s=1) == 1.0


def _times(log: str, marker: str) -> list[float]:
    """Timestamps (the CLI's asctime) of the log lines containing ``marker``."""
    stamps = []
    for line in log.splitlines():
        if marker in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            stamps.append(stamp.timestamp())
    return stamps


# -- orphans -------------------------------------------------------------------------------------


def test_killing_the_supervisor_leaves_no_worker_process_behind(launch: Any) -> None:
    worker = launch("-p", "2", "-t", "1")
    children = worker.wait_ready(2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait_exit(10)
    worker.wait(lambda: all(gone(pid) for pid in children), 60, "no orphans")
    assert worker.log().count("Worker process stopped (exit code 0)") == 2  # stopped gracefully


def test_worker_process_stops_by_itself_when_its_parent_changed(
    app_db: str, tmp_path: Path
) -> None:
    """The portable fallback of PR_SET_PDEATHSIG: a parent that is not the expected one."""
    log_path = tmp_path / "child.log"
    command = [sys.executable, "-m", "tasker.runtime.worker_process"]
    command += ["--parent-pid", str(os.getppid()), "--threads", "1", "--", MODULE]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            env=_environment(app_db, {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    try:
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert f"The supervisor (pid {os.getppid()}) is gone; stopping." in log_path.read_text()


# -- signals -------------------------------------------------------------------------------------


def test_one_sigterm_stops_gracefully_and_leaves_nothing_leased(
    app_db: str, producer: PGMQBroker, launch: Any
) -> None:
    worker = launch("-p", "2", "-t", "2", **LONG_LEASE)
    worker.wait_ready(2)
    for i in range(12):
        send_work(producer, f"g{i}", sleep_s=0.5)
    worker.wait(lambda: count(app_db, "test_exec_log", "kind='start'") >= 2, 30, "handlers")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.log()
    assert scalar(app_db, LEASED) == 0, "prefetched messages must be visible again at once"
    finished = count(app_db, "test_ledger")
    assert count(app_db, "test_exec_log", "kind='start'") == finished  # nothing was cut off
    assert count(app_db, "pgmq.q_tasker_default") == 12 - finished  # the rest is still queued
    assert worker.log().count("Worker process stopped (exit code 0)") == 2


@pytest.mark.parametrize("target", ["supervisor", "process group"])
def test_one_stop_request_to_the_whole_process_group_is_still_graceful(
    app_db: str, producer: PGMQBroker, launch: Any, target: str
) -> None:
    # `kill -- -PGID`, systemd's KillMode=control-group and a terminal reach every worker process
    # directly *and* through the supervisor: that is one request, not a forced stop.
    worker = launch("-p", "2", "-t", "1", **LONG_LEASE)
    worker.wait_ready(2)
    send_work(producer, "running-at-stop", sleep_s=3)
    worker.wait(lambda: count(app_db, "test_exec_log", "kind='start'") == 1, 30, "the handler")
    stop(worker, target)
    assert worker.wait_exit(60) == 0, worker.log()
    assert count(app_db, "test_ledger") == 1  # the running handler finished
    assert "Forced stop" not in worker.log()
    assert worker.log().count("Worker process stopped (exit code 0)") == 2


def stop(worker: TaskerWorker, target: str) -> None:
    """SIGTERM to the supervisor only, or to its whole process group."""
    if target == "supervisor":
        worker.send(signal.SIGTERM)
    else:
        os.killpg(worker.pid, signal.SIGTERM)


@pytest.mark.parametrize("target", ["supervisor", "process group"])
def test_second_sigterm_forces_the_exit_and_releases_the_running_message(
    app_db: str, producer: PGMQBroker, launch: Any, target: str
) -> None:
    worker = launch("-p", "1", "-t", "1", **LONG_LEASE)
    worker.wait_ready(1)
    send_work(producer, "long", sleep_s=30)
    worker.wait(lambda: count(app_db, "test_exec_log", "kind='start'") == 1, 30, "the handler")
    stop(worker, target)
    worker.wait(lambda: "Stopping: running handlers" in worker.log(), 30, "the graceful stop")
    assert worker.running()  # waiting for the 30 s handler
    stop(worker, target)
    started = time.monotonic()
    code = worker.wait_exit(25)
    assert time.monotonic() - started < 25
    assert code != 0, worker.log()
    assert scalar(app_db, LEASED) == 0, "the running message must be visible again at once"
    assert count(app_db, "pgmq.q_tasker_default") == 1  # not acked: it will run again
    assert count(app_db, "test_ledger") == 0  # the handler was abandoned
    assert "Released 1 held message(s)." in worker.log()


def test_sighup_restarts_every_worker_process_gracefully(
    app_db: str, producer: PGMQBroker, launch: Any
) -> None:
    worker = launch("-p", "2", "-t", "1", **SHORT_LEASE)
    before = worker.wait_ready(2)
    worker.send(signal.SIGHUP)
    worker.wait(lambda: len(worker.ready_children() - before) == 2, 60, "two new processes")
    assert worker.running()
    assert worker.log().count("stopped for the reload") == 2
    assert "restarting in" not in worker.log()  # a reload is not a crash: no backoff
    send_work(producer, "after-reload")
    worker.wait(lambda: count(app_db, "test_ledger") == 1, 30, "work after the reload")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.log()


def test_a_worker_started_before_the_migrations_comes_up_once_they_ran(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A deploy where the workers start before the migrate Job: each worker process refuses to
    boot with a clear line and is restarted with backoff, not given up (exit code 78)."""
    worker = TaskerWorker(empty_database_url, tmp_path / "worker.log").start("-p", "1", "-t", "1")
    try:
        worker.wait(lambda: "restarting in" in worker.log(), 60, "a refused boot")
        log = worker.log()
        assert "The database lacks" in log and "run `tasker db migrate`" in log
        assert "exited with exit code 4" in log
        assert worker.running()
        migrate(empty_database_url)
        worker.wait_ready(1, timeout=90)  # restart delays stay under 30 s
        worker.send(signal.SIGTERM)
        assert worker.wait_exit(60) == 0, worker.log()
    finally:
        worker.cleanup()


def test_modules_that_cannot_be_imported_stop_the_supervisor(launch: Any) -> None:
    worker = launch("-p", "2", module="tests.workers.no_such_module")
    assert worker.wait_exit(60) == EXIT_CONFIG, worker.log()
    assert "could not load its modules" in worker.log()
    assert "restarting in" not in worker.log()  # restarting cannot help

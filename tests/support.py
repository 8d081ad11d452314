"""Helpers for tests that run real `dramatiq` worker subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from dramatiq.message import Message

from tasker.brokers.pgmq import PGMQBroker

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """`dramatiq tasker.actors tests.workers.actors` in its own process group."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        module: str = "tests.workers.actors",
        **settings: Any,
    ) -> None:
        self.module = module
        self.database_url = database_url
        self.log_path = log_path
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, processes: int = 1, threads: int = 2) -> WorkerProcess:
        env = dict(os.environ)
        env.update(
            TASKER_ENV="test",
            TASKER_DATABASE__URL=self.database_url,
            PYTHONPATH=str(ROOT),
        )
        for key, value in self.settings.items():
            env[key] = str(value)
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            "tasker.actors",
            self.module,
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--path",
            str(ROOT),
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def alive_without_children(self) -> bool:
        """The `dramatiq` parent runs but has no worker process under it (a worker process
        died and the parent did not follow): it will never consume again."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return not path.read_text().split()
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and children)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (graceful shutdown) and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def step_uuid(url: str, task: str, name: str) -> str:
    """The id of step ``name`` of ``task``."""
    return str(
        scalar(
            url,
            "SELECT workflow_step_uuid FROM tasker.workflow_steps WHERE task_uuid = %s"
            " AND name = %s",
            (task, name),
        )
    )


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def reporting_readiness(directory: Path) -> Iterator[Callable[[], bool]]:
    """This test process reports its readiness to ``directory`` as a booted worker process
    would; yields ``() -> ready``: what the supervisor's ``/health/ready`` makes of the file (a
    pod of this one process). The process's readiness is restored afterwards."""
    from tasker import readiness
    from tasker.runtime.pod_health import ChildView, PodHealth

    saved = (readiness._Reporter.status, readiness._Reporter.directory)
    readiness._Reporter.status = readiness.ProcessStatus(pid=0)
    readiness.configure(directory)
    readiness.report_booted()
    pid = os.getpid()

    def pod_ready() -> bool:
        statuses = readiness.read_statuses(directory)
        return PodHealth.evaluate([ChildView(0, pid, False)], statuses, stopping=None).ready

    try:
        yield pod_ready
    finally:
        readiness._Reporter.status, readiness._Reporter.directory = saved


def scalar(url: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def send_work(broker: PGMQBroker, key: str, sleep_s: float = 0.0, actor: str = "work") -> None:
    """Enqueue a message for an actor of tests.workers.actors without importing it."""
    broker.declare_queue("default")
    args: tuple[Any, ...] = (key, sleep_s) if actor == "work" else (key,)
    broker.enqueue(
        Message(queue_name="default", actor_name=actor, args=args, kwargs={}, options={})
    )


class InProcessFlows:
    """Workflows run by an in-process Dramatiq worker (4 threads) on a test's database.

    ``register(flow)`` binds the flow's steps and registers its template; ``start(flow)`` also
    starts the worker (once); ``run(flow, context)`` also submits a task and waits for its final
    state. ``install_options`` go to :func:`tasker.runtime.workflows.install`.
    """

    def __init__(self, broker: PGMQBroker, url: str, **install_options: Any) -> None:
        import dramatiq

        import tasker
        from tasker.runtime.workflows import install

        install(broker, bind_workflows=False, finalization_lease_s=5, **install_options)
        self.broker = broker
        self.url = url
        self.client = tasker.Client(broker=broker)
        self.worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
        self._started = False

    def register(self, *flows: Any) -> None:
        from tasker.runtime.workflows import bind_workflow

        for flow in flows:
            bind_workflow(self.broker, flow)
            self.client.register(flow)

    def start(self, *flows: Any) -> None:
        self.register(*flows)
        if not self._started:
            self._started = True
            self.worker.start()

    def run(self, flow: Any, context: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        self.start(flow)
        handle = self.client.submit(flow.namespace, flow.name, context or {})
        return self.client.wait(handle.task_uuid, timeout=timeout)

    def stop(self) -> None:
        """Stop the worker once (running handlers finish first); later calls do nothing."""
        if not getattr(self, "_stopped", False):
            self._stopped = True
            self.worker.stop()


def age_task(url: str, task: str, *, minutes: int) -> None:
    """Make the task's last activity (its transitions and its steps' times) ``minutes`` old."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tasker.task_transitions SET created_at = created_at - make_interval(mins => %s)"
            " WHERE task_uuid = %s",
            (minutes, task),
        )
        conn.execute(
            "UPDATE tasker.workflow_steps SET last_attempted_at = last_attempted_at"
            " - make_interval(mins => %s), finished_at = finished_at - make_interval(mins => %s),"
            " processed_at = processed_at - make_interval(mins => %s) WHERE task_uuid = %s",
            (minutes, minutes, minutes, task),
        )

"""`tasker worker` serves /metrics, /health/live and /health/ready for all its worker processes.

Real workers (`python -m tasker.cli worker ...`, see tests/test_worker_supervisor.py) on a real
database: the metrics of two worker processes add up to what the database recorded, survive a
process being killed, and the readiness probe follows boot, restarts and a graceful stop. Every
wait is on a condition with a deadline; the windows the probes are checked in are held open by
the test (a module that waits at import for a file, a handler that runs until a file exists).
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dramatiq.message import Message
from prometheus_client.parser import text_string_to_metric_families

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.messages import TASK_REQUEST
from tasker.runtime.sender import BrokerSender
from tests.test_worker_supervisor import TaskerWorker, children_of

pytestmark = pytest.mark.slow

PORT = re.compile(r"on port (\d+)\.")
FINAL = ("complete", "blocked_by_failures")


@pytest.fixture
def launch(app_db: str, tmp_path: Path) -> Iterator[Any]:
    """``launch(module, *options, **environment)`` starts a `tasker worker`; killed at the end."""
    started: list[TaskerWorker] = []

    def start(module: str, *options: str, **environment: Any) -> TaskerWorker:
        worker = TaskerWorker(app_db, tmp_path / f"worker{len(started)}.log", module, **environment)
        started.append(worker)
        return worker.start(*options)

    yield start
    for worker in started:
        worker.cleanup()


class Endpoint:
    """The HTTP endpoints of one `tasker worker`, on the port its log names."""

    def __init__(self, worker: TaskerWorker) -> None:
        worker.wait(lambda: PORT.search(worker.log()) is not None, 60, "the metrics port")
        match = PORT.search(worker.log())
        assert match is not None
        self.port = int(match.group(1))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/health/ready")
        return status, json.loads(body) if body else {}

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def rows(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def expected_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What /metrics must say, from the database: steps by final record, claims, tasks."""
    ns = (("namespace", "metered"), ("workflow", "mixed"))
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for step, state, count in rows(
        url,
        "SELECT s.name, t.to_state, count(*) FROM tasker.workflow_step_transitions t "
        "JOIN tasker.workflow_steps s USING (workflow_step_uuid) "
        "WHERE t.to_state IN ('complete', 'error', 'waiting_for_retry') GROUP BY 1, 2",
    ):
        labels = tuple(sorted((*ns, ("step", step), ("state", state))))
        expected[("tasker_steps_finished_total", labels)] = count
    ((attempts,),) = rows(url, "SELECT sum(attempts) FROM tasker.workflow_steps")
    claimed = tuple(sorted((*ns, ("outcome", "claimed"))))
    expected[("tasker_step_claims_total", claimed)] = attempts
    for state, count in rows(url, "SELECT state, count(*) FROM tasker.tasks GROUP BY 1"):
        expected[("tasker_tasks_finished_total", (("state", state),))] = count
    for succeeded, count in rows(
        url,
        "SELECT succeeded, count(*) FROM tasker.finalization_attempts "
        "WHERE action = 'claim' GROUP BY 1",
    ):
        outcome = (("outcome", "claimed" if succeeded else "already_claimed"),)
        expected[("tasker_finalization_claim_attempts_total", outcome)] = count
    return expected


def mismatches(endpoint: Endpoint, expected: dict[Any, float]) -> dict[Any, Any]:
    scraped = endpoint.metrics()
    return {k: (scraped.get(k), v) for k, v in expected.items() if scraped.get(k) != v}


def submit(producer: PGMQBroker, url: str, contexts: list[dict[str, Any]]) -> None:
    """Half the tasks through the client, half as task-request messages for the workers."""
    client = tasker.Client(broker=producer)
    sender = BrokerSender(producer)
    for i, context in enumerate(contexts):
        if i % 2:
            client.submit("metered", "mixed", context)
        else:
            request = {"namespace": "metered", "name": "mixed", "context": context}
            with psycopg.connect(url, autocommit=True) as conn:
                sender.send_stage(conn, TASK_REQUEST, request)


def test_metrics_of_two_worker_processes_add_up_to_the_steps_they_ran(
    app_db: str, producer: PGMQBroker, launch: Any
) -> None:
    worker = launch("tests.workers.metered", "-p", "2", "-t", "2", "--metrics-port", "0")
    endpoint = Endpoint(worker)
    worker.wait(lambda: endpoint.ready()[0] == 200, 90, "both worker processes ready")
    contexts = [{}] * 4 + [{"flaky": True}] * 4 + [{"fail": True}] * 2
    submit(producer, app_db, contexts)
    done = "SELECT count(*) FROM tasker.tasks WHERE state = ANY(%s)"
    worker.wait(lambda: rows(app_db, done, (list(FINAL),)) == [(10,)], 120, "every task")

    expected = expected_metrics(app_db)
    ns = (("namespace", "metered"), ("workflow", "mixed"))
    steps = {
        (dict(labels)["step"], dict(labels)["state"]): value
        for (name, labels), value in expected.items()
        if name == "tasker_steps_finished_total"
    }
    assert steps == {
        ("begin", "complete"): 10,
        ("flaky", "complete"): 8,
        ("flaky", "waiting_for_retry"): 4,
        ("flaky", "error"): 2,
        ("end", "complete"): 8,
    }
    assert expected[("tasker_tasks_finished_total", (("state", "complete"),))] == 8
    expected[("tasker_tasks_created_total", ns)] = 5  # the requests; the client counts its own
    expected[("tasker_worker_processes", (("state", "ready"),))] = 2
    expected[("tasker_worker_ready", ())] = 1
    expected[("tasker_steps_in_progress", ns)] = 0
    # The counters move right after each commit: wait for the last ones, then compare all.
    worker.wait(lambda: not mismatches(endpoint, expected), 30, "the metrics to add up")

    victim = sorted(children_of(worker.pid))[0]
    os.kill(victim, signal.SIGKILL)
    worker.wait(lambda: victim not in children_of(worker.pid), 30, "the kill")

    def replaced() -> bool:
        status, body = endpoint.ready()
        pids = {p["pid"] for p in body.get("processes", ())}
        return status == 200 and victim not in pids

    worker.wait(replaced, 90, "a replacement, ready")
    expected[("tasker_worker_process_restarts_total", ())] = 1
    assert mismatches(endpoint, expected) == {}  # the dead process's counts are kept
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(90) == 0, worker.log()


def test_readiness_follows_boot_and_a_graceful_stop(
    app_db: str, producer: PGMQBroker, launch: Any, tmp_path: Path
) -> None:
    gate, release = tmp_path / "boot", tmp_path / "release"
    worker = launch(
        "tests.workers.gated",
        "-p",
        "2",
        "-t",
        "1",
        TEST_WORKER_BOOT_GATE=gate,
        TEST_WORKER_RELEASE=release,
    )
    endpoint = Endpoint(worker)
    assert endpoint.get("/health/live")[0] == 200

    def states() -> list[str]:
        return [p["state"] for p in endpoint.ready()[1].get("processes", ())]

    worker.wait(lambda: states() == ["starting", "starting"], 60, "both processes booting")
    status, body = endpoint.ready()
    assert status == 503 and body["status"] == "not ready"  # held in their boot by the gate
    children = children_of(worker.pid)
    environ = Path(f"/proc/{min(children)}/environ").read_bytes().split(b"\0")
    (variable,) = [v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    private = Path(variable.split(b"=", 1)[1].decode())
    assert private.is_dir()

    gate.touch()
    worker.wait(lambda: endpoint.ready()[0] == 200, 90, "ready once booted")
    producer.declare_queue("default")
    producer.enqueue(
        Message(queue_name="default", actor_name="hold", args=("long",), kwargs={}, options={})
    )
    started = "SELECT count(*) FROM test_exec_log WHERE kind = 'start' AND key = 'long'"
    worker.wait(lambda: rows(app_db, started) == [(1,)], 60, "the long handler to start")

    worker.send(signal.SIGTERM)  # graceful: the handler runs on until the release file exists
    worker.wait(lambda: endpoint.ready()[0] == 503, 30, "not ready from the first SIGTERM")
    status, body = endpoint.ready()
    assert status == 503 and "stopping (a stop request was received)" in body["reasons"]
    assert endpoint.get("/health/live")[0] == 200
    assert worker.running()
    assert rows(app_db, "SELECT count(*) FROM test_exec_log WHERE kind = 'end'") == [(0,)]

    release.touch()
    assert worker.wait_exit(90) == 0, worker.log()
    assert rows(app_db, "SELECT count(*) FROM test_exec_log WHERE kind = 'end'") == [(1,)]
    assert endpoint.get("/health/live") == (0, "")  # nothing listens any more
    assert not private.exists()  # the private directory went with the supervisor

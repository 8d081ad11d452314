"""The worker's Prometheus metrics, counted in process: every count matches what the database
recorded, and the pieces the supervisor builds on (the multiprocess files of exited processes,
the readiness files, the pod's readiness rule) behave.

The metrics of this test process live in prometheus-client's default registry and accumulate
over the session, so tests compare differences (:class:`Samples`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tasker import readiness
from tasker.coordinator.metrics import METRIC_NAMES, CoordinatorMetrics
from tasker.engine.messages import TASK_REQUEST
from tasker.engine.results import ResultApplied
from tasker.engine.sql_outcomes import ClaimOutcome
from tasker.engine.steps import StepExecutor, StepReport, StepRunner, Unclaimed
from tasker.metrics import BreakerState, WorkerMetrics, set_breaker_state, worker_metrics
from tasker.middleware.metrics import Metrics, counts_as_finished
from tasker.readiness import ProcessStatus
from tasker.runtime.pod_health import ChildView, PodHealth
from tasker.runtime.pod_metrics import PodFiles, SupervisorMetrics, pod_registry
from tasker.runtime.sender import BrokerSender
from tasker.workflow.states import StepState
from tests.support import ROOT, InProcessFlows
from tests.workers import metered

STEP_STATES = ("complete", "error", "waiting_for_retry")


class Samples:
    """Differences of the default registry's samples since it was made."""

    def __init__(self) -> None:
        self.before = self._read()

    @staticmethod
    def _read() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in REGISTRY.collect()
            for s in family.samples
        }

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._read().get(key, 0.0) - self.before.get(key, 0.0)


def rows(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def recorded_steps(url: str) -> dict[tuple[str, str], int]:
    """(step, state) -> transitions a worker's record made (the database's count)."""
    found = rows(
        url,
        "SELECT s.name, t.to_state, count(*) FROM tasker.workflow_step_transitions t "
        "JOIN tasker.workflow_steps s USING (workflow_step_uuid) "
        "WHERE t.to_state = ANY(%s) GROUP BY 1, 2",
        (list(STEP_STATES),),
    )
    return {(name, state): int(n) for name, state, n in found}


def test_in_process_counts_match_the_database(flows: InProcessFlows) -> None:
    samples = Samples()
    flows.start(metered.flow)
    contexts = [{}] * 3 + [{"flaky": True}] * 3 + [{"fail": True}] * 2
    handles = [flows.client.submit("metered", "mixed", dict(c)) for c in contexts]
    final = [flows.client.wait(h.task_uuid, timeout=60).state for h in handles]
    assert final.count("complete") == 6 and final.count("blocked_by_failures") == 2

    labels = {"namespace": "metered", "workflow": "mixed"}
    expected = recorded_steps(flows.url)
    assert expected == {
        ("begin", "complete"): 8,
        ("flaky", "complete"): 6,
        ("flaky", "waiting_for_retry"): 3,
        ("flaky", "error"): 2,
        ("end", "complete"): 6,
    }
    for (step, state), count in expected.items():
        assert samples.delta("tasker_steps_finished_total", step=step, state=state, **labels) == (
            count
        ), (step, state)
    attempts = rows(flows.url, "SELECT name, attempts FROM tasker.workflow_steps")
    assert samples.delta("tasker_step_claims_total", outcome="claimed", **labels) == sum(
        a for _, a in attempts
    )
    for step in ("begin", "flaky", "end"):
        runs = sum(a for name, a in attempts if name == step)
        step_labels = {"step": step, **labels}
        assert samples.delta("tasker_step_duration_seconds_count", **step_labels) == runs
        done = [a for name, a in attempts if name == step and a]  # each ran completed or failed
        assert samples.delta("tasker_step_attempts_count", **step_labels) == len(done)
        assert samples.delta("tasker_step_attempts_sum", **step_labels) == sum(done)
    assert samples.delta("tasker_steps_in_progress", **labels) == 0
    queue = {"queue": "worker_metered_queue"}
    assert samples.delta("tasker_messages_total", outcome="done", **queue) == sum(
        a for _, a in attempts
    )
    assert samples.delta("tasker_tasks_created_total", **labels) == 8  # by Client.submit
    assert samples.delta("tasker_tasks_finished_total", state="complete") == 6
    assert samples.delta("tasker_tasks_finished_total", state="blocked_by_failures") == 2
    claims = dict(
        rows(
            flows.url,
            "SELECT succeeded, count(*) FROM tasker.finalization_attempts "
            "WHERE action = 'claim' GROUP BY 1",
        )
    )
    assert samples.delta("tasker_finalization_claim_attempts_total", outcome="claimed") == (
        claims.get(True, 0)
    )
    assert samples.delta(
        "tasker_finalization_claim_attempts_total", outcome="already_claimed"
    ) == claims.get(False, 0)
    assert samples.delta("tasker_finalization_claim_duration_seconds_count") == sum(claims.values())


def test_a_task_request_message_counts_the_task_it_creates_once(flows: InProcessFlows) -> None:
    flows.start(metered.flow)
    samples = Samples()
    request = {"namespace": "metered", "name": "mixed", "context": {}, "idempotency_key": "k1"}
    sender = BrokerSender(flows.broker)
    for _ in range(2):  # the second finds the task the first created
        with psycopg.connect(flows.url, autocommit=True) as conn:
            sender.send_stage(conn, TASK_REQUEST, request)
    flows.broker.join(TASK_REQUEST.queue, timeout=30_000)
    assert rows(flows.url, "SELECT count(*) FROM tasker.tasks") == [(1,)]
    labels = {"namespace": "metered", "workflow": "mixed"}
    assert samples.delta("tasker_tasks_created_total", **labels) == 1


class _Raises:
    def step_started(self, runner: StepRunner, attempt: int) -> None:
        raise RuntimeError("a broken observer")

    def step_finished(self, report: StepReport) -> None:
        raise RuntimeError("a broken observer")


def test_a_failing_observer_changes_nothing_for_the_step(flows: InProcessFlows) -> None:
    from tasker.runtime.steps import step_executor

    executor: StepExecutor = step_executor(flows.broker)
    executor.observers.insert(0, _Raises())
    try:
        status = flows.run(metered.flow, {})
    finally:
        executor.observers.pop(0)
    assert status.state == "complete"


def test_the_observer_counts_each_report_by_its_claim_and_state() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(WorkerMetrics(registry))
    runner = StepRunner("ns", "wf", lambda ctx: None, step="s")
    metrics.step_finished(StepReport(runner, ClaimOutcome.BUSY))
    metrics.step_finished(StepReport(runner, ClaimOutcome.SKIPPED))
    metrics.step_finished(StepReport(runner, Unclaimed.BREAKER_OPEN))
    metrics.step_started(runner, 2)
    applied = ResultApplied(StepState.ERROR, "blocked_by_failures")
    metrics.step_finished(StepReport(runner, ClaimOutcome.RECLAIMED, 2, applied, 0.25))
    metrics.step_finished(
        StepReport(runner, ClaimOutcome.EXHAUSTED, 3, ResultApplied(StepState.ERROR))
    )

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ns = {"namespace": "ns", "workflow": "wf"}
    step = {**ns, "step": "s"}
    for outcome in ("busy", "skipped", "breaker_open", "reclaimed", "exhausted"):
        assert value("tasker_step_claims_total", outcome=outcome, **ns) == 1
    assert value("tasker_steps_in_progress", **ns) == 0  # started once, finished once
    assert value("tasker_steps_finished_total", state="error", **step) == 2
    assert value("tasker_step_duration_seconds_count", **step) == 1  # one handler ran
    assert value("tasker_step_duration_seconds_sum", **step) == 0.25
    assert value("tasker_step_attempts_sum", **step) == 5  # attempts 2 and 3 ended the step
    assert value("tasker_tasks_finished_total", state="blocked_by_failures") == 1


@pytest.mark.parametrize(
    ("state", "counted"),
    [
        ("complete", True),
        ("blocked_by_failures", True),
        ("error", True),
        ("cancelled", True),
        ("steps_in_process", False),
        ("waiting_for_retry", False),
        (None, False),
        ("no such state", False),
        (42, False),
    ],
)
def test_which_task_states_count_as_finished(state: object, counted: bool) -> None:
    assert counts_as_finished(state) is counted


# -- circuit breakers --------------------------------------------------------------------------


def test_breaker_state_gauge_takes_names_and_members() -> None:
    value = REGISTRY.get_sample_value
    set_breaker_state("test_database", "open")
    assert value("tasker_circuit_breaker_state", {"breaker": "test_database"}) == 1
    set_breaker_state("test_database", "half-open")
    assert value("tasker_circuit_breaker_state", {"breaker": "test_database"}) == 2
    set_breaker_state("test_database", BreakerState.CLOSED)
    assert value("tasker_circuit_breaker_state", {"breaker": "test_database"}) == 0
    with pytest.raises(ValueError, match="use closed, open or half_open"):
        set_breaker_state("test_database", "ajar")
    assert worker_metrics() is worker_metrics()


def test_the_coordinator_metric_names_are_its_families() -> None:
    registry = CollectorRegistry()
    CoordinatorMetrics(registry)
    assert {family.name for family in registry.collect()} == METRIC_NAMES


# -- the supervisor's multiprocess directory -------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os
    from tasker.metrics import set_breaker_state, worker_metrics

    metrics = worker_metrics()
    metrics.step_claims.labels("ns", "wf", "claimed").inc(3)
    metrics.step_duration.labels("ns", "wf", "s").observe(0.3)
    metrics.steps_in_progress.labels("ns", "wf").inc()
    set_breaker_state("database", "open")
    print(os.getpid())
    """
)


def _run_child(files: PodFiles) -> int:
    """A process that updates its metrics in ``files`` and exits; returns its pid."""
    env = files.child_env({**os.environ, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _scrape(files: PodFiles) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = pod_registry(files, SupervisorMetrics(lambda: (True, {"ready": 2}, 1)))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def pod_files() -> Iterator[PodFiles]:
    files = PodFiles()
    yield files
    files.close()
    assert not files.root.exists()


def test_exited_processes_keep_their_counts_and_leave_one_file_per_type(
    pod_files: PodFiles,
) -> None:
    claims = (
        "tasker_step_claims_total",
        (("namespace", "ns"), ("outcome", "claimed"), ("workflow", "wf")),
    )
    durations = (
        "tasker_step_duration_seconds_count",
        (("namespace", "ns"), ("step", "s"), ("workflow", "wf")),
    )
    running = ("tasker_steps_in_progress", (("namespace", "ns"), ("workflow", "wf")))
    first, second = _run_child(pod_files), _run_child(pod_files)
    before = _scrape(pod_files)
    assert before[claims] == 6 and before[durations] == 2 and before[running] == 2
    breakers = {k for k in before if k[0] == "tasker_circuit_breaker_state"}
    assert {dict(labels)["pid"] for _, labels in breakers} == {str(first), str(second)}

    pod_files.process_exited(first)
    after_one = _scrape(pod_files)
    assert after_one[claims] == 6 and after_one[durations] == 2
    assert after_one[running] == 1  # a live gauge goes with its process
    pod_files.process_exited(second)
    third = _run_child(pod_files)
    pod_files.process_exited(third)  # folded into the archive made from the first two
    after_all = _scrape(pod_files)
    assert after_all[claims] == 9 and after_all[durations] == 3
    assert running not in after_all
    assert not any(k[0] == "tasker_circuit_breaker_state" for k in after_all)
    assert sorted(p.name for p in pod_files.metrics_dir.iterdir()) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]

    def bucket(le: str) -> float:
        labels = tuple(sorted((*durations[1], ("le", le))))
        return after_all[("tasker_step_duration_seconds_bucket", labels)]

    assert (bucket("0.25"), bucket("0.5"), bucket("+Inf")) == (0, 3, 3)  # still cumulative
    assert after_all[("tasker_worker_ready", ())] == 1
    assert after_all[("tasker_worker_processes", (("state", "ready"),))] == 2
    assert after_all[("tasker_worker_process_restarts_total", ())] == 1


def test_children_get_the_private_directory_even_over_an_inherited_one(
    pod_files: PodFiles,
) -> None:
    env = pod_files.child_env({"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else", "KEEP": "1"})
    assert env == {"PROMETHEUS_MULTIPROC_DIR": str(pod_files.metrics_dir), "KEEP": "1"}
    assert pod_files.root.stat().st_mode & 0o777 == 0o700


def test_coordinator_families_of_an_in_worker_coordinator_are_left_out(
    pod_files: PodFiles,
) -> None:
    child = "from tasker.coordinator.metrics import CoordinatorMetrics\n"
    child += "CoordinatorMetrics().depth.labels('q').set(5)\n"
    child += "from tasker.metrics import worker_metrics\n"
    child += "worker_metrics().tasks_finished.labels('complete').inc()\n"
    env = pod_files.child_env({**os.environ, "PYTHONPATH": str(ROOT)})
    subprocess.run([sys.executable, "-c", child], env=env, cwd=ROOT, check=True)
    names = {name for name, _ in _scrape(pod_files)}
    assert "tasker_tasks_finished_total" in names
    assert not any(name.startswith("tasker_queue_") for name in names)


# -- readiness -----------------------------------------------------------------------------


@pytest.fixture
def reporter(tmp_path: Path) -> Iterator[Path]:
    """This test process reports its readiness to ``tmp_path`` (restored afterwards)."""
    saved = (readiness._Reporter.status, readiness._Reporter.directory)
    readiness._Reporter.status = ProcessStatus(pid=0)
    readiness.configure(tmp_path, worker_id=3)
    yield tmp_path
    readiness._Reporter.status, readiness._Reporter.directory = saved


def test_a_process_reports_boot_reasons_and_stopping(reporter: Path) -> None:
    pid = os.getpid()

    def read() -> ProcessStatus:
        return readiness.read_statuses(reporter)[pid]

    assert read() == ProcessStatus(pid=pid, worker_id=3)
    assert not read().ready  # not booted yet
    readiness.report_booted()
    assert read().ready
    readiness.set_process_ready(False, "database breaker open", source="database")
    readiness.set_process_ready(False, source="other")
    assert read().not_ready == {"database": "database breaker open", "other": "not ready"}
    readiness.set_process_ready(True, source="database")
    assert not read().ready
    readiness.set_process_ready(True, source="other")
    assert read().ready
    readiness.report_stopping()
    assert not read().ready and read().stopping
    assert readiness.process_status() == read()
    assert [p.name for p in reporter.iterdir()] == [f"{pid}.json"]  # no temporary left
    json.loads((reporter / f"{pid}.json").read_text())


def test_unreadable_status_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "2.json").write_text(json.dumps({"pid": 2, "booted": True}))
    assert readiness.read_statuses(tmp_path) == {2: ProcessStatus(pid=2, booted=True)}
    assert readiness.read_statuses(tmp_path / "missing") == {}


BOOTED = ProcessStatus(pid=11, booted=True)


@pytest.mark.parametrize(
    ("child", "status", "state"),
    [
        (ChildView(0, None, False), None, "down"),
        (ChildView(0, 11, False), None, "starting"),
        (ChildView(0, 11, False), ProcessStatus(pid=11), "starting"),
        (ChildView(0, 11, False), BOOTED, "ready"),
        (ChildView(0, 11, True), BOOTED, "stopping"),
        (ChildView(0, 11, False), ProcessStatus(pid=11, booted=True, stopping=True), "stopping"),
        (
            ChildView(0, 11, False),
            ProcessStatus(pid=11, booted=True, not_ready={"database": "breaker open"}),
            "not_ready",
        ),
    ],
)
def test_each_process_state(child: ChildView, status: ProcessStatus | None, state: str) -> None:
    statuses = {} if status is None else {status.pid: status}
    health = PodHealth.evaluate([child], statuses, stopping=None)
    assert health.states == {0: state}
    assert health.ready is (state == "ready")


def test_the_pod_is_ready_only_when_every_process_and_check_is() -> None:
    two = [ChildView(0, 11, False), ChildView(1, 12, False)]
    both = {11: BOOTED, 12: ProcessStatus(pid=12, booted=True)}
    assert PodHealth.evaluate(two, both, stopping=None).ready
    one = PodHealth.evaluate(two, {11: BOOTED}, stopping=None)
    assert not one.ready and one.reasons == ["worker process 1 (pid 12) starting"]
    stopping = PodHealth.evaluate(two, both, stopping="stopping")
    assert not stopping.ready and stopping.reasons == ["stopping"]
    held = {**both, 12: ProcessStatus(pid=12, booted=True, not_ready={"db": "breaker open"})}
    body = PodHealth.evaluate(two, held, stopping=None).body()
    assert body["reasons"] == ["worker process 1 (pid 12) not_ready: breaker open"]
    assert body["processes"][1] == {
        "index": 1,
        "pid": 12,
        "state": "not_ready",
        "not_ready": {"db": "breaker open"},
    }

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    checks = [lambda: (True, ""), lambda: (False, "queue too deep"), broken]
    failed = PodHealth.evaluate(two, both, stopping=None, checks=checks)
    assert not failed.ready
    assert failed.reasons[0] == "queue too deep"
    assert failed.reasons[1].startswith("broken raised RuntimeError")


# -- the supervisor's HTTP thread and the parent-death signal -------------------------------


def test_sigterms_after_the_supervisor_is_gone_are_one_request() -> None:
    """PR_SET_PDEATHSIG sends one SIGTERM per supervisor thread that exits after the one that
    started the process (the HTTP server's is one): they never add up to a forced stop."""
    from tasker.runtime.worker_process import StopRequests

    orphaned = StopRequests(parent=os.getppid() + 100_000)  # not our parent: it is gone
    orphaned.request(4242)
    orphaned.request(4242)
    orphaned.request(StopRequests.PARENT_GONE)
    assert orphaned.requested and not orphaned.forced
    attached = StopRequests(parent=os.getppid())
    attached.request(4242)
    assert not attached.forced
    attached.request(4242)
    assert attached.forced


# -- docs/operations.md ------------------------------------------------------------------------


def _documented(marker: str) -> dict[str, str]:
    """Metric name -> type, from the table after ``<!-- marker`` in docs/operations.md."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    lines = doc[doc.index(f"<!-- {marker}") :].splitlines()[3:]
    found = {}
    for line in lines:
        if not line.startswith("|"):
            break
        name, kind = (cell.strip() for cell in line.strip("|").split("|")[:2])
        found[re.match(r"`(tasker_[a-z_]+)", name).group(1)] = kind  # type: ignore[union-attr]
    return found


def _exported(registry: CollectorRegistry) -> dict[str, str]:
    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in registry.collect()
    }


def test_the_guide_tables_every_worker_metric() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    registry.register(SupervisorMetrics(lambda: (True, {}, 0)))
    assert _documented("worker-metrics") == _exported(registry)


def test_the_guide_names_every_claim_outcome() -> None:
    """``tasker_step_claims_total``'s outcomes: the claim's answers, and ``breaker_open``."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `tasker_step_claims_total`"))
    meaning = row.strip("|").split("|")[3]
    documented = set(re.findall(r"`([a-z_]+)`", meaning))
    assert documented == {o.value for o in ClaimOutcome} | {u.value for u in Unclaimed}


def test_the_guide_tables_every_coordinator_metric() -> None:
    registry = CollectorRegistry()
    CoordinatorMetrics(registry)
    assert _documented("coordinator-metrics") == _exported(registry)


def test_a_metrics_port_in_use_stops_tasker_worker_before_it_starts_anything(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from tasker.cli import main

    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["worker", "tests.workers.dying", "-p", "1", "--metrics-port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"tasker: error: port {port} is in use (by another tasker worker?)" in err
    assert "pass --metrics-port" in err and "TASKER_WORKER__METRICS_PORT" in err
    assert "Started worker process" not in err

"""The coordinator's retention, scaling hints, worker registry, CLI commands and process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.cli import main
from tasker.coordinator.loop import Coordinator
from tasker.engine.retention import apply_retention
from tasker.engine.scaling import ScalingRule, read_scaling_hints, update_scaling_hints
from tasker.settings import CoordinatorSettings
from tests.shapes import LINEAR, Recorder, build_flow
from tests.support import ROOT, InProcessFlows, scalar, wait_for

NOW = CoordinatorSettings(recovery_grace_s=0, retention_every_s=0, interval_s=1)

# -- retention -----------------------------------------------------------------------------------

_FINISHED = """
WITH nt AS (SELECT named_task_uuid FROM tasker.named_tasks LIMIT 1),
made AS (
    INSERT INTO tasker.tasks (named_task_uuid, state, complete, identity_hash, correlation_id,
                              requested_at, completed_at)
    SELECT nt.named_task_uuid, 'complete', true, 'old-' || i, gen_random_uuid(),
           now() - interval '60 days', now() - interval '60 days' + i * interval '1 ms'
    FROM nt, generate_series(1, %(n)s) AS i
    RETURNING task_uuid
), steps AS (
    INSERT INTO tasker.workflow_steps (task_uuid, named_step_uuid, name, state)
    SELECT made.task_uuid, (SELECT named_step_uuid FROM tasker.named_steps LIMIT 1), 's1',
           'complete'
    FROM made RETURNING workflow_step_uuid, task_uuid
), step_tr AS (
    INSERT INTO tasker.workflow_step_transitions (workflow_step_uuid, to_state, sort_key)
    SELECT workflow_step_uuid, 'complete', 1 FROM steps
)
INSERT INTO tasker.task_transitions (task_uuid, to_state, sort_key)
SELECT task_uuid, 'complete', 1 FROM made
"""


@pytest.mark.slow
def test_retention_deletes_100000_finished_tasks_in_short_batches(flows: InProcessFlows) -> None:
    flows.client.register(build_flow("old", LINEAR, Recorder()))
    keep = flows.client.submit("shapes", "old", {}).task_uuid  # active: never deleted
    with psycopg.connect(flows.url, autocommit=True) as conn:
        conn.execute(_FINISHED, {"n": 100_000})
        conn.execute("ANALYZE")
    blocked: list[str] = []
    stop = threading.Event()

    def other_session() -> None:  # meanwhile, others work on tasks; none may wait on retention
        with psycopg.connect(flows.url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '1s'")
            while not stop.is_set():
                try:
                    with conn.transaction():
                        conn.execute(
                            "SELECT 1 FROM tasker.tasks WHERE task_uuid = %s FOR UPDATE", (keep,)
                        )
                except psycopg.errors.LockNotAvailable as exc:
                    blocked.append(str(exc))

    watcher = threading.Thread(target=other_session, daemon=True)
    watcher.start()
    deleted, longest = 0, 0.0
    try:
        with psycopg.connect(flows.url, autocommit=True) as conn:
            for _ in range(1000):  # bounded: 100,000 / 200 = 500 batches
                report = apply_retention(conn, days=30, batch=200, budget_s=5, coordinator="t")
                deleted += report.tasks
                longest = max(longest, report.longest_batch_s)
                if report.tasks == 0:
                    break
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert deleted == 100_000
    assert blocked == []
    assert longest < 1.0, f"a batch held its locks for {longest:.2f}s"
    counts = scalar(
        flows.url,
        "SELECT max((detail->>'tasks')::int) FROM tasker.coordinator_actions"
        " WHERE action = 'retention_batch'",
    )
    assert counts == 200
    for table in ("tasks", "workflow_steps", "task_transitions", "workflow_step_transitions"):
        assert scalar(flows.url, f"SELECT count(*) FROM tasker.{table}") < 10, table
    assert flows.client.status(keep).state == "steps_in_process"


# -- scaling -------------------------------------------------------------------------------------


def rule_outcome(url: str, **kw: Any) -> tuple[int, bool]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT desired, changed FROM tasker.desired_replicas_v1(%(current)s, %(in_flight)s,"
            " %(depth)s, %(error_rate)s, %(capacity)s, %(target)s, %(backlog)s, %(min)s,"
            " %(max)s, 0.05, %(since)s, %(cooldown)s)",
            kw,
        ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


_INPUTS = st.fixed_dictionaries(
    {
        "current": st.none() | st.integers(0, 60),
        "in_flight": st.integers(0, 10_000),
        "depth": st.integers(0, 1_000_000),
        "error_rate": st.floats(0, 1),
        "capacity": st.integers(1, 64),
        "target": st.floats(0.1, 1.0),
        "backlog": st.integers(1, 1000),
        "min": st.integers(0, 5),
        "max": st.integers(5, 50),
        "since": st.floats(0, 600),
        "cooldown": st.floats(0, 300),
    }
)


@settings(max_examples=150, deadline=None)
@given(inputs=_INPUTS)
def test_the_scaling_rule_stays_in_bounds_and_respects_the_cooldown(
    template_database: str, server_url: str, inputs: dict[str, Any]
) -> None:
    from tests.conftest import with_database

    url = with_database(server_url, template_database)
    desired, changed = rule_outcome(url, **inputs)
    current = inputs["current"]
    if current is not None and inputs["since"] < inputs["cooldown"]:
        assert desired == current and not changed  # no change inside the cooldown
        return
    assert inputs["min"] <= desired <= inputs["max"]
    if current is not None and inputs["min"] <= current <= inputs["max"] and desired < current:
        assert current - desired <= (current - inputs["min"] + 1) // 2 + 1  # half the excess
    assert changed == (current is None or desired != current)


def test_the_scaling_rule_up_with_errors_inside_the_cooldown_and_down(database_url: str) -> None:
    """Fixed cases of the rule: 2 processes x 8 threads, 30 in flight, 450 queued (the worked
    example of docs/operations.md is checked against the document by test_operations_docs.py)."""
    base = {"capacity": 16, "target": 0.75, "backlog": 100, "min": 1, "max": 10, "cooldown": 60}
    assert rule_outcome(
        database_url, current=2, in_flight=30, depth=450, error_rate=0.0, since=300, **base
    ) == (5, True)
    assert rule_outcome(
        database_url, current=2, in_flight=30, depth=450, error_rate=0.1, since=300, **base
    ) == (6, True)
    assert rule_outcome(
        database_url, current=2, in_flight=30, depth=450, error_rate=0.0, since=10, **base
    ) == (2, False)
    assert rule_outcome(
        database_url, current=9, in_flight=0, depth=0, error_rate=0.0, since=300, **base
    ) == (5, True)


def test_hints_are_written_from_queues_and_live_workers(flows: InProcessFlows) -> None:
    import dramatiq

    @dramatiq.actor(broker=flows.broker, queue_name="busy")
    def busy(n: int) -> None: ...

    for i in range(250):
        busy.send(i)
    with psycopg.connect(flows.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasker.workers (worker_uuid, hostname, pid, queues, actors, threads,"
            " tasker_version) VALUES (gen_random_uuid(), 'pod-a', 1, '{busy}', '{}', 8, 'x'),"
            " (gen_random_uuid(), 'pod-b', 1, '{busy}', '{}', 8, 'x')"
        )
        rule = ScalingRule(processes=1, threads=8, backlog_per_replica=100, max_replicas=10)
        [hint] = update_scaling_hints(conn, [("busy", "tasker_busy")], rule, live_s=60)
        assert (hint.depth, hint.live_replicas, hint.desired_replicas) == (250, 2, 3)
        [again] = read_scaling_hints(conn)
        assert again.desired_replicas == 3


def test_depth_counts_what_workers_have_to_do_now(flows: InProcessFlows) -> None:
    """Visible and held messages count; delayed ones (a retry's backoff) and parked ones (a
    deferred delivery, a bounce for an actor nobody has) do not, held or not."""
    import dramatiq

    @dramatiq.actor(broker=flows.broker, queue_name="mixed")
    def mixed(n: int) -> None: ...

    for i in range(18):
        mixed.send(i)
    table = 'pgmq."q_tasker_mixed"'
    future = "clock_timestamp() + interval '5 minutes'"
    with psycopg.connect(flows.url, autocommit=True) as conn:
        ids = [row[0] for row in conn.execute(f"SELECT msg_id FROM {table} ORDER BY msg_id")]
        held, parked, delayed = ids[5:8], ids[8:12], ids[12:]
        conn.execute(
            f"UPDATE {table} SET read_ct = 1, vt = {future} WHERE msg_id = ANY(%s)", (held,)
        )
        conn.execute(f"UPDATE {table} SET vt = {future} WHERE msg_id = ANY(%s)", (delayed,))
        for msg_id in parked:  # what the broker's defer and bounce statements write
            conn.execute(
                f"UPDATE {table} SET read_ct = 1, vt = {future}, headers = jsonb_build_object("
                f"'parked_until_ms', (extract(epoch FROM {future}) * 1000)::bigint)"
                " WHERE msg_id = %s",
                (msg_id,),
            )
        [hint] = update_scaling_hints(conn, [("mixed", "tasker_mixed")], ScalingRule(), live_s=60)
    assert (hint.depth, hint.in_flight) == (8, 3)


def test_a_deferred_or_bounced_delivery_is_marked_parked(flows: InProcessFlows) -> None:
    import dramatiq

    @dramatiq.actor(broker=flows.broker, queue_name="parking")
    def parking(n: int) -> None: ...

    parking.send(1)
    parking.send(2)
    names = flows.broker.names("parking")
    with psycopg.connect(flows.url, autocommit=True) as conn:
        claimed = conn.execute(
            flows.broker.statement("claim", names), {"limit": 2, "lease_ms": 60_000}
        ).fetchall()
        [(first, first_ct, _, _), (second, second_ct, _, _)] = claimed
        for statement, msg_id, read_ct in (
            ("defer", first, first_ct),
            ("bounce", second, second_ct),
        ):
            conn.execute(
                flows.broker.statement(statement, names),
                {"msg_id": msg_id, "read_ct": read_ct, "delay_ms": 30_000},
            )
        [hint] = update_scaling_hints(conn, [("parking", names.main)], ScalingRule(), live_s=60)
    assert (hint.depth, hint.in_flight) == (0, 0)


# -- registry and CLI ------------------------------------------------------------------------------


def test_workers_register_heartbeat_and_leave(flows: InProcessFlows) -> None:
    flows.start(build_flow("reg", LINEAR, Recorder()))
    wait_for(
        lambda: scalar(flows.url, "SELECT count(*) FROM tasker.workers") == 1,
        30,
        "the worker to register",
    )
    with psycopg.connect(flows.url, autocommit=True) as conn:
        row = conn.execute("SELECT pid, threads, actors, queues FROM tasker.workers").fetchone()
    assert row is not None and row[0] == os.getpid() and row[1] == 4
    assert "tasker.shapes.reg@1.0.0.s1" in row[2] and "worker_shapes_queue" in row[3]
    flows.stop()
    assert scalar(flows.url, "SELECT count(*) FROM tasker.workers") == 0


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_lists_workers_hints_and_the_task_dlq(
    flows: InProcessFlows, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", flows.url)
    flows.client.register(build_flow("cli", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "cli", {}).task_uuid
    with psycopg.connect(flows.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tasker.task_transitions SET created_at = now() - interval '2 hours'"
            " WHERE task_uuid = %s",
            (task,),
        )
    assert main(["coordinator", "--once"]) == 0
    summary = capsys.readouterr().out
    assert "leader: yes" in summary and "stale tasks moved to the task DLQ: 1" in summary
    assert _cli_json(capsys, "workers") == []
    hints = _cli_json(capsys, "scale")
    assert {h["queue"] for h in hints} >= {"worker_shapes_queue"}
    [entry] = _cli_json(capsys, "dlq", "tasks", "list")
    assert entry["task_uuid"] == task
    shown = _cli_json(capsys, "dlq", "tasks", "show", entry["dlq_entry_uuid"])
    assert shown["task_snapshot"]["task_name"] == "cli"
    assert (shown["namespace"], shown["task_name"]) == ("shapes", "cli")
    assert main(["dlq", "tasks", "show", entry["dlq_entry_uuid"]]) == 0
    summary = capsys.readouterr().out
    assert "shapes/cli 1.0.0" in summary and "steps_in_process" in summary
    assert [line.split()[0] for line in summary.splitlines() if line.startswith("s")][-4:] == [
        "s1",
        "s2",
        "s3",
        "s4",
    ]
    resolved = _cli_json(
        capsys, "dlq", "tasks", "resolve", entry["dlq_entry_uuid"], "--status", "cancelled"
    )
    assert resolved["resolution_status"] == "cancelled"
    assert _cli_json(capsys, "dlq", "tasks", "list") == []
    assert main(["dlq", "tasks", "show", "not-a-uuid"]) == 1
    assert "is not a DLQ entry id" in capsys.readouterr().err


@pytest.mark.slow
def test_the_coordinator_process_serves_metrics_and_health_and_stops_on_sigterm(
    database_url: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ, TASKER_ENV="test", TASKER_DATABASE__URL=database_url, PYTHONPATH=str(ROOT)
    )
    log = tmp_path / "coordinator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasker.cli",
                "coordinator",
                "--port",
                str(port),
                "--interval",
                "0.5",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError:
                return 0, ""

        wait_for(lambda: get("/health/ready")[0] == 200, 60, "the coordinator to be ready")
        assert get("/health/live")[0] == 200
        _status, text = get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["tasker_coordinator_leader"].samples[0].value == 1
        assert "tasker_desired_workers" in families
        assert families["tasker_coordinator_cycles"].samples[0].value >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert tasker.__version__


def test_retention_expires_dead_letters_of_queues_it_never_declared(
    flows: InProcessFlows,
) -> None:
    """The coordinator declares no queue; the dead-letter TTL still applies to every queue."""
    broker = flows.broker
    broker.declare_queue("worker_ttl_queue")
    names = broker.names("worker_ttl_queue")
    broker.ensure_queue(names, create=True)
    dead = f'pgmq."q_{names.dead}"'
    with psycopg.connect(flows.url, autocommit=True) as conn:
        for age_days in (8, 1):
            conn.execute(
                f"INSERT INTO {dead} (vt, message, enqueued_at) VALUES "
                "(now(), '{}'::jsonb, now() - %s * interval '1 day')",
                (age_days,),
            )
    fresh = PGMQBroker(url=flows.url)  # a coordinator process: nothing declared
    coordinator = Coordinator(fresh, msgspec.structs.replace(NOW, retention_every_s=0), name="ttl")
    try:
        report = coordinator.cycle()
    finally:
        coordinator.close()
        fresh.close()
    assert report.retention is not None and report.retention.dead_letters_expired == 1
    assert scalar(flows.url, f"SELECT count(*) FROM {dead}") == 1  # the 1-day-old one stays


def test_the_orchestration_pool_has_one_row_of_its_own(flows: InProcessFlows) -> None:
    """Its Deployment scales on the rule applied to the four queues together, not on the sum of
    four rows that are each at least min_replicas."""
    from tasker.coordinator.loop import ORCHESTRATION_QUEUES
    from tasker.engine.scaling import ORCHESTRATION_POOL

    queues = [(name, flows.broker.names(name).main) for name in ORCHESTRATION_QUEUES]
    for _, pgmq_name in queues:
        with psycopg.connect(flows.url, autocommit=True) as conn:
            conn.execute("SELECT pgmq.create(%s)", (pgmq_name,))
    rule = ScalingRule(processes=1, threads=8, backlog_per_replica=100, min_replicas=1)
    with psycopg.connect(flows.url, autocommit=True) as conn:
        idle = update_scaling_hints(conn, queues, rule, live_s=60, pool_queues=ORCHESTRATION_QUEUES)
        assert {h.queue: h.desired_replicas for h in idle}[ORCHESTRATION_POOL] == 1
        for _, pgmq_name in queues:  # 150 waiting in each: 600 for the pool
            conn.execute(
                "SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[150]))", (pgmq_name,)
            )
        conn.execute("DELETE FROM tasker.scaling_hints")  # no cooldown from the first pass
        busy = {
            h.queue: h
            for h in update_scaling_hints(
                conn, queues, rule, live_s=60, pool_queues=ORCHESTRATION_QUEUES
            )
        }
    assert busy[ORCHESTRATION_POOL].depth == 600
    assert busy[ORCHESTRATION_POOL].desired_replicas == 6
    assert all(busy[name].desired_replicas == 2 for name, _ in queues)


def test_retention_keeps_a_task_whose_dlq_entry_waits_for_an_operator(
    flows: InProcessFlows,
) -> None:
    from tasker.engine.staleness import list_dlq, resolve_dlq_entry

    flows.client.register(build_flow("kept", LINEAR, Recorder()))
    task = flows.client.submit("shapes", "kept", {}).task_uuid
    with psycopg.connect(flows.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tasker.task_transitions SET created_at = now() - interval '2 hours'"
            " WHERE task_uuid = %s",
            (task,),
        )
    coordinator = Coordinator(flows.broker, NOW, name="kept")
    try:
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()
    with psycopg.connect(flows.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tasker.tasks SET completed_at = now() - interval '60 days'"
            " WHERE task_uuid = %s",
            (task,),
        )
        assert apply_retention(conn, days=30, coordinator="t").tasks == 0
        [entry] = list_dlq(conn)
        resolve_dlq_entry(
            conn, str(entry.dlq_entry_uuid), status="permanently_failed", notes=None, by=None
        )
        assert apply_retention(conn, days=30, coordinator="t").tasks == 1

"""The `tasker` command against a real database."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import dramatiq
import psycopg
import pytest

from tasker.brokers.pgmq import PGMQBroker
from tasker.cli import main


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    return database_url


def test_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tasker.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("db", "worker", "queues", "dlq", "deploy", "settings", "demo"):
        assert command in result.stdout


def test_db_migrate_and_status(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db", "status"]) == 0
    out = capsys.readouterr().out
    assert "pgmq: pgmq-1.13.0" in out and "pending" not in out


def test_db_schema_check_passes_on_a_migrated_database(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "schema", "--check"]) == 0
    assert "current" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db.internal/app", "postgresql://app:***@db.internal/app"),
        (
            "postgresql://db.internal/app?password=s3cret",
            "postgresql://db.internal/app?password=***",
        ),
        ("host=db.internal password=s3cret dbname=app", "host=db.internal password=*** dbname=app"),
        (
            "host=db.internal password='s3cret word' dbname=app",
            "host=db.internal password=*** dbname=app",
        ),
        ("postgres://app:s3cret@db1:5432,db2:5433/app", "postgres://app:***@db1:5432,db2:5433/app"),
        ("postgresql://app:s3c%40ret@[::1]:5432/app", "postgresql://app:***@[::1]:5432/app"),
        (
            "postgresql://app@db.internal/app?sslmode=require&sslpassword=s3cret",
            "postgresql://app@db.internal/app?sslmode=require&sslpassword=***",
        ),
        (
            "host=db.internal password = s3cret dbname=app",
            "host=db.internal password = *** dbname=app",
        ),
        (
            "postgresql:///app?host=/run/pg&password=s3cret",
            "postgresql:///app?host=/run/pg&password=***",
        ),
    ],
)
def test_settings_masks_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, shown: str
) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", url)
    assert main(["--env", "production", "settings"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert json.loads(out)["database"]["url"] == shown


def test_settings_masks_a_password_in_any_url_valued_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not only database.url: every string printed goes through the same masking."""
    from tasker.cli import _masked

    monkeypatch.setenv("TASKER_DATABASE__APPLICATION_NAME", "postgresql://app:s3cret@db/app")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert json.loads(out)["database"]["application_name"] == "postgresql://app:***@db/app"
    data = {
        "sentry": {"dsn": "https://key:s3cret@o1.ingest.sentry.io/1"},
        "cache": ["redis://:s3cret@cache:6379/0", "host=x password=s3cret"],
        "plain": ["INFO", ".tasker/pgdata", 5, None, True],
    }
    masked = _masked(data)
    assert "s3cret" not in json.dumps(masked)
    assert masked["sentry"]["dsn"] == "https://key:***@o1.ingest.sentry.io/1"
    assert masked["plain"] == data["plain"]


def test_an_unparsable_database_url_is_a_settings_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", "postgresql://app:s3cret@[::1/app")
    assert main(["--env", "production", "settings"]) == 1
    err = capsys.readouterr().err
    assert "Invalid setting 'database.url'" in err and "TASKER_DATABASE__URL" in err
    assert "postgresql://app:***@[::1/app" in err and "s3cret" not in err


def test_bad_settings_exit_1_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKER_BROKER__CLAIM_BATCH", "lots")
    assert main(["settings"]) == 1
    assert "TASKER_BROKER__CLAIM_BATCH" in capsys.readouterr().err


def test_queues_and_dead_letter_commands(
    env: str, broker: PGMQBroker, worker: dramatiq.Worker, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []

    @dramatiq.actor(max_retries=0)
    def fails_once(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("first time fails")

    fails_once.send(1)
    broker.join(fails_once.queue_name, timeout=10_000)
    assert main(["queues"]) == 0
    table = capsys.readouterr().out
    assert "tasker_default" in table
    assert main(["queues", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == [
        {
            "queue": "tasker_default",
            "visible": 0,
            "delayed": 0,
            "leased": 0,
            "dead": 1,
            "oldest_visible_s": 0.0,
        }
    ]
    assert main(["dlq", "list", "default"]) == 0
    letter = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "first time fails" in letter["headers"]["error"]
    assert letter["message"]["args"] == [1]
    assert main(["dlq", "replay", "default", "--all"]) == 0
    assert "replayed 1" in capsys.readouterr().out
    broker.join(fails_once.queue_name, timeout=10_000)
    assert calls == [1, 1]
    assert main(["dlq", "purge", "default", "--yes"]) == 0
    assert "deleted 0" in capsys.readouterr().out


def test_queues_create_makes_queues_without_auto_create(
    env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "cli_actors_mod.py"
    module.write_text(
        "import dramatiq\n@dramatiq.actor(queue_name='billing')\ndef bill():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TASKER_BROKER__AUTO_CREATE_QUEUES", "false")
    assert main(["queues", "create", "cli_actors_mod"]) == 0
    assert "pgmq.q_tasker_billing" in capsys.readouterr().out
    with psycopg.connect(env) as conn:
        assert conn.execute("SELECT to_regclass('pgmq.q_tasker_billing__xq')").fetchone() == (
            "pgmq.q_tasker_billing__xq",
        )


def test_queues_create_makes_the_workflow_and_orchestration_queues_a_worker_declares(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`queues create` of a workflow module creates its namespace's worker queue and the four
    orchestration queues, as a worker of that module declares them, besides plain actors'."""
    import importlib

    from tasker.brokers.queue_names import map_queue_name
    from tasker.engine.messages import FINALIZE, PROCESS_RESULT, STEP_ENQUEUE, TASK_REQUEST

    monkeypatch.setenv("TASKER_BROKER__AUTO_CREATE_QUEUES", "false")
    importlib.import_module("tests.workers.queued")  # imported before: its actor bound elsewhere
    assert main(["queues", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # a migrated database without queues
    assert main(["queues", "create", "tests.workers.queued"]) == 0
    out = capsys.readouterr().out
    assert "queue worker_queued_queue -> pgmq.q_tasker_worker_queued_queue" in out
    assert main(["queues", "--json"]) == 0
    listed = {q["queue"] for q in json.loads(capsys.readouterr().out)}
    expected = ["worker_queued_queue", "queued_plain"]  # the workflow's steps; a plain actor
    expected += [s.queue for s in (TASK_REQUEST, STEP_ENQUEUE, PROCESS_RESULT, FINALIZE)]
    assert {map_queue_name(q, "tasker").main for q in expected} <= listed


def test_worker_command_runs_workers_and_stops_on_sigterm(env: str, tmp_path: Any) -> None:
    import signal

    from tests.support import wait_for

    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasker.cli",
                "worker",
                "tests.workers.actors",
                "-p",
                "1",
                "-t",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "is ready" in log_path.read_text(errors="replace") or proc.poll() is not None,
            60,
            "the worker process to start",
        )
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_end_to_end(env: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tasker.cli", "demo", "--orders", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 orders complete" in result.stdout
    assert "retrying: payment provider busy" in result.stdout
    assert "ship_order         complete" in result.stdout


def test_db_status_and_dlq_list_print_json(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tasker.db.migrate import available_migrations

    assert main(["db", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pending"] == [] and status["pgmq"]
    assert status["applied"] == [m.version for m in available_migrations()]
    assert main(["queues", "create", "tests.workers.queued"]) == 0
    capsys.readouterr()
    assert main(["dlq", "list", "queued_plain", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

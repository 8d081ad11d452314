"""The `tasker` command fails with one clear line (and the fix), never a traceback."""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tasker.brokers.pgmq import PGMQBroker
from tasker.brokers.queue_names import map_queue_name
from tasker.cli import EXIT_BROKEN_PIPE, main

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://root:s3cret@127.0.0.1:1/x"  # nothing listens on port 1


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    return database_url


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tasker: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["db", "status"],
        ["db", "migrate"],
        ["db", "schema", "--check"],
        ["queues"],
        ["queues", "--json"],
        ["dlq", "list", "default"],
        ["dlq", "purge", "default", "--yes"],
        ["dlq", "replay", "default", "--all"],
        ["workers"],
        ["scale"],
        ["dlq", "tasks", "list"],
        ["coordinator", "--once"],
    ],
    ids=" ".join,
)
def test_an_unreachable_database_is_one_line_naming_the_masked_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", UNREACHABLE)
    assert main(argv) == 1
    line = _error_line(capsys)
    assert "Cannot reach PostgreSQL at postgresql://root:***@127.0.0.1:1/x" in line
    assert "TASKER_DATABASE__URL" in line
    assert "s3cret" not in line


@pytest.mark.parametrize(
    "argv",
    [
        ["queues"],
        ["queues", "--json"],
        ["queues", "create", "tests.workers.flows"],
        ["queues", "create", "tests.workers.actors"],
        ["dlq", "list", "default"],
        ["dlq", "replay", "default", "--all"],
        ["dlq", "replay", "default", "--id", "1"],
        ["dlq", "purge", "default", "--yes"],
        ["dlq", "tasks", "list"],
        [
            "dlq",
            "tasks",
            "resolve",
            "00000000-0000-0000-0000-000000000000",
            "--status",
            "cancelled",
        ],
        ["workers"],
        ["scale"],
        ["db", "schema", "--check"],
        ["db", "schema", "--write"],
    ],
    ids=" ".join,
)
def test_an_unmigrated_database_says_to_migrate(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    empty_database_url: str,
    argv: list[str],
) -> None:
    """(`tasker worker` says it in each worker process and restarts it with backoff:
    tests/test_worker_supervisor.py; `coordinator --once` in its report: below.)"""
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", empty_database_url)
    snapshot = (ROOT / "sql" / "schema.sql").read_text()
    assert main(argv) == 1
    line = _error_line(capsys)
    assert "run `tasker db migrate`" in line and line.endswith("`tasker db migrate`.")
    assert (ROOT / "sql" / "schema.sql").read_text() == snapshot  # --write wrote nothing


def test_a_coordinator_on_an_unmigrated_database_waits_and_says_to_migrate(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    empty_database_url: str,
) -> None:
    """One error line per change of state (not a traceback per action per cycle), `--once`
    exits 1, and a long-running coordinator is not ready until the migrations ran."""
    from tasker.coordinator.loop import Coordinator
    from tasker.db.migrate import migrate
    from tasker.settings import CoordinatorSettings

    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", empty_database_url)
    assert main(["coordinator", "--once", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["leader"] is True
    assert list(report["errors"]) == ["schema"]
    assert "run `tasker db migrate`" in report["errors"]["schema"]
    assert "Traceback" not in caplog.text
    broker = PGMQBroker(url=empty_database_url)
    coordinator = Coordinator(broker, CoordinatorSettings(), name="unmigrated")
    try:
        caplog.clear()
        for _ in range(3):
            assert list(coordinator.cycle().errors) == ["schema"]
        assert caplog.text.count("waits: the database lacks") == 1
        ready, detail = coordinator.ready()
        assert not ready and "tasker db migrate" in detail["schema"]
        migrate(empty_database_url)
        assert coordinator.cycle().errors == {}
        assert coordinator.ready()[0]
    finally:
        coordinator.close()
        broker.close()


def test_coordinator_json_without_once_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["coordinator", "--json"])
    assert exited.value.code == 2
    assert "add --once" in capsys.readouterr().err


@pytest.mark.parametrize(
    "queue",
    ["nosuchqueue", "Billing.Emails", "pgmq.q_tasker_nosuchqueue", "tasker_default__xq", "a b", ""],
)
@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "list"],
        ["dlq", "purge", "--yes"],
        ["dlq", "replay", "--all"],
        ["dlq", "replay", "--id", "1"],
    ],
    ids=" ".join,
)
def test_a_missing_queue_is_named_with_how_to_list_the_queues(
    env: str, broker: PGMQBroker, capsys: pytest.CaptureFixture[str], argv: list[str], queue: str
) -> None:
    """A typo, a queue never used (no message sent, not created), a dead-letter queue's own
    name: one line naming it, saying how queues come to exist and how to list them."""
    broker.ensure_queue(map_queue_name("default", "tasker"), create=True)
    assert main([*argv[:2], queue, *argv[2:]]) == 1
    line = _error_line(capsys)
    assert f"No queue named {queue!r} in namespace 'tasker'" in line
    assert "`tasker queues create MODULES` made it" in line
    assert "`tasker queues` lists" in line


def test_dlq_purge_on_a_terminal_names_a_missing_queue_before_asking(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert main(["dlq", "purge", "nosuchqueue"]) == 1
    assert "No queue named 'nosuchqueue'" in _error_line(capsys)


@pytest.mark.parametrize("queue", ["default", "Billing.Emails", "order_intake_" + "x" * 60])
def test_dlq_takes_the_queue_name_or_the_pgmq_name_tasker_queues_prints(
    env: str, broker: PGMQBroker, capsys: pytest.CaptureFixture[str], queue: str
) -> None:
    names = map_queue_name(queue, "tasker")
    broker.ensure_queue(names, create=True)
    capsys.readouterr()
    assert main(["queues", "--json"]) == 0
    printed = {q["queue"] for q in json.loads(capsys.readouterr().out)}
    assert names.main in printed  # hashed when the name is long or not lower case
    for name in (queue, names.main, f"pgmq.q_{names.main}"):  # what queues create prints
        assert main(["dlq", "list", name]) == 0
        assert main(["dlq", "replay", name, "--all"]) == 0
        assert main(["dlq", "purge", name, "-y"]) == 0
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "list", "default", "--limit", "-1"], "argument --limit: must be at least 1"),
        (["dlq", "list", "default", "--limit", "0"], "argument --limit: must be at least 1"),
        (["dlq", "list", "default", "--limit", "x"], "argument --limit: must be a whole number"),
        (["dlq", "tasks", "list", "--limit", "0"], "argument --limit: must be at least 1"),
        (["dlq", "replay", "default", "--id", "0"], "argument --id: must be at least 1"),
        (["demo", "--orders", "0"], "argument --orders: must be at least 1"),
        (["worker", "mod", "-p", "0"], "argument -p/--processes: must be at least 1"),
        (["worker", "mod", "--shutdown-timeout", "nan"], "argument --shutdown-timeout"),
        (["coordinator", "--interval", "nan"], "argument --interval: must be a finite number"),
        (["coordinator", "--interval", "inf"], "argument --interval: must be a finite number"),
        (["coordinator", "--interval", "0"], "argument --interval: must be at least 0.1"),
        (["coordinator", "--interval", "-1"], "argument --interval: must be at least 0.1"),
        (["coordinator", "--interval", "1e6"], "at most 3600"),
        (["coordinator", "--interval", "soon"], "argument --interval: must be a number"),
        (["coordinator", "--port", "99999"], "argument --port: must be a TCP port from 0"),
        (["coordinator", "--port", "-1"], "argument --port: must be a TCP port from 0"),
        # upper bounds: what SQL cannot take, or what can only be a typo
        (["dlq", "list", "default", "--limit", "100001"], "--limit: must be at most 100000"),
        (["dlq", "list", "default", "--limit", "9" * 20], "--limit: must be at most 100000"),
        (["dlq", "list", "default", "--limit", "9" * 5000], "--limit: must be a whole number"),
        (["dlq", "tasks", "list", "--limit", "9" * 20], "--limit: must be at most 100000"),
        (
            ["dlq", "replay", "default", "--id", "9" * 20],
            "--id: must be at most 9223372036854775807",
        ),
        (
            ["dlq", "replay", "default", "--id", "1", "2", "x"],
            "--id: must be a whole number, not 'x'",
        ),
        (["demo", "--orders", "1001"], "argument --orders: must be at most 1000"),
        (["worker", "mod", "-p", "257"], "argument -p/--processes: must be at most 256"),
        (["worker", "mod", "-t", "1025"], "argument -t/--threads: must be at most 1024"),
        (["worker", "mod", "-t", "0"], "argument -t/--threads: must be at least 1"),
        (["worker", "mod", "--shutdown-timeout", "1e300"], "from 0 to 86400 (a day)"),
        (["worker", "mod", "--shutdown-timeout", "-1"], "from 0 to 86400 (a day)"),
        (["deploy", "workers", "a", "--modules", "m", "--max-replicas", "1001"], "at most 1000"),
        (["deploy", "workers", "a", "--modules", "m", "--min-replicas", "0"], "at least 1"),
        (["deploy", "workers", "a", "--modules", "m", "--processes", "1000"], "at most 256"),
        (["deploy", "workers", "a", "--modules", "m", "--threads", "99999"], "at most 1024"),
        (
            ["deploy", "workers", "a", "--modules", "m", "--shutdown-timeout", "86401"],
            "--shutdown-timeout: must be at most 86400 (a day)",
        ),
        (
            ["deploy", "workers", "a", "--modules", "m", "--termination-grace-period", "1e9"],
            "--termination-grace-period: must be a whole number",
        ),
        (
            ["deploy", "workers", "a", "--modules", "m", "--termination-grace-period", "86401"],
            "--termination-grace-period: must be at most 86400 (a day)",
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_bad_numbers_are_usage_errors_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_queues_create_names_a_module_it_cannot_import(
    env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cli_broken_mod.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "cli_needs_mod.py").write_text("import cli_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["queues", "create", "cli_no_such_mod"]) == 1
    assert "No module named 'cli_no_such_mod'" in _error_line(capsys)
    assert main(["queues", "create", "cli_broken_mod"]) == 1
    assert "Importing module 'cli_broken_mod' failed: RuntimeError: boom" in _error_line(capsys)
    assert main(["queues", "create", "cli_needs_mod"]) == 1
    line = _error_line(capsys)
    assert "Importing module 'cli_needs_mod' failed" in line
    assert "cli_missing_dependency" in line


def test_worker_names_a_module_no_worker_process_could_find(
    env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasker.cli import _check_findable
    from tasker.runtime.worker_process import EXIT_CONFIG

    # 78, as docs/workers.md says (and as a worker process exits for an import error)
    assert main(["worker", "cli_no_such_mod", "-p", "1"]) == EXIT_CONFIG
    assert "No module named 'cli_no_such_mod': check its spelling" in _error_line(capsys)
    assert (
        main(["worker", "tests.workers.actors", "cli_no_such_pkg.actors", "-p", "1"]) == EXIT_CONFIG
    )
    assert "No module named 'cli_no_such_pkg' (of 'cli_no_such_pkg.actors')" in _error_line(capsys)
    (tmp_path / "cli_elsewhere_mod.py").write_text("raise RuntimeError('not imported here')\n")
    _check_findable(["cli_elsewhere_mod"], [str(tmp_path)])  # found by --path, not imported
    assert "cli_elsewhere_mod" not in sys.modules


def test_the_coordinator_names_a_port_in_use(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["coordinator", "--port", str(port)]) == 1
    line = _error_line(capsys)
    assert f"port {port} is in use" in line and "pass --port" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["settings"],
        ["queues"],
        ["queues", "--json"],
        ["dlq", "tasks", "list", "--json"],
        ["db", "status"],
        ["db", "url"],
        ["db", "schema"],
        ["workers"],
        ["scale"],
        ["coordinator", "--once"],
        ["deploy", "workers", "fulfillment", "billing", "--modules", "myapp.flows"],
    ],
    ids=" ".join,
)
def test_a_closed_stdout_ends_the_command_quietly(env: str, argv: list[str]) -> None:
    """`tasker ... | head -1`: the reader is gone before the output is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tasker.cli", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert result.returncode == EXIT_BROKEN_PIPE, result.stderr
    assert "Error" not in result.stderr and "Exception" not in result.stderr


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://u:p%@db.internal/app", "write the password's special characters"),
        ("notaurl", "is neither a postgresql:// URL nor libpq key=value pairs"),
        ("postgresql://db.internal:notaport/app", "has a port that is not a number"),
        ("postgresql://db.internal:99999/app", "has a port that is not a number"),
        ("postgresql://u:s3cret/x@db.internal/app", "has a port that is not a number"),
        ("postgresql://u:s3c@ret@db.internal/app", "has more than one @ before the host"),
        ("host=db.internal port=abc dbname=app", "has port='abc'"),
        ("host=db.internal password='s3cret", "quote a value that holds spaces"),
        ("mysql://u:s3cret@db.internal/app", "not a mysql:// URL"),
        ("POSTGRESQL://db.internal/app", "in lower case"),
    ],
)
def test_a_malformed_database_url_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, problem: str
) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", url)
    for argv in (["settings"], ["queues"], ["db", "status"]):
        assert main(argv) == 1
        line = _error_line(capsys)
        assert "Invalid setting 'database.url'" in line and "TASKER_DATABASE__URL" in line
        assert problem in line
        assert "s3cret" not in line and "ret@" not in line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"[default]\nlog_level = 'INFO'\n[default.broker\n", "is not valid TOML: Expected ']'"),
        (b"[default.broker]\nnamespace = \n", "is not valid TOML: Invalid value (at line 2"),
        (b"\xff\xfe[default]\n", "is not UTF-8 text"),
        (b"development = 5\n", "'development' must be a [development] table"),
        (b"[default.broker]\nclaim_batch = 'lots'\n", "'broker.claim_batch'"),
        (b"[default.broker]\nlisten = 'maybe'\n", "'broker.listen'"),
        (b"[default]\nbroker = 'x'\n", "'broker' for environment"),
        (b"[default.database]\nurl = 5\n", "'database.url' for environment"),
        (b"[default.coordinator]\nport = 1e400\n", "'coordinator.port'"),
        (b"[default.broker]\nclaim_batch = 4\nclaim_batchh = 4\n", "Unknown setting"),
    ],
    ids=[
        "unclosed table",
        "missing value",
        "not UTF-8",
        "environment not a table",
        "string for an int",
        "string for a bool",
        "string for a table",
        "int for a URL",
        "infinite port",
        "unknown key",
    ],
)
def test_a_malformed_settings_file_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes, problem: str
) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(text)
    assert main(["--settings", str(path), "settings"]) == 1
    line = _error_line(capsys)
    assert problem in line and str(path) in line


def test_a_settings_path_that_is_not_a_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--settings", str(tmp_path), "settings"]) == 1
    assert f"Settings file {tmp_path} is not a file" in _error_line(capsys)
    assert main(["--settings", str(tmp_path / "nope.toml"), "settings"]) == 1
    assert "nope.toml does not exist" in _error_line(capsys)


class _Terminal(io.StringIO):
    """A stdin that is a terminal, whose person answers ``answer`` (after ``before_answer``)."""

    def __init__(self, answer: str, before_answer: Callable[[], None] = lambda: None) -> None:
        super().__init__(answer)
        self.before_answer = before_answer

    def isatty(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        self.before_answer()
        return super().readline(size)


def _dead_letters(database_url: str, queue: str, count: int) -> None:
    names = map_queue_name(queue, "tasker")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(count):
            conn.execute("SELECT pgmq.send(%s, '{}'::jsonb)", (names.dead,))


def _dead_count(database_url: str, queue: str) -> int:
    names = map_queue_name(queue, "tasker")
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f'SELECT count(*) FROM pgmq."q_{names.dead}"').fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def dead_default(env: str, broker: PGMQBroker) -> str:
    """The test's database with 3 dead letters in the queue `default`."""
    broker.ensure_queue(map_queue_name("default", "tasker"), create=True)
    _dead_letters(env, "default", 3)
    return env


@pytest.mark.parametrize("stdin", [io.StringIO("y\n"), None], ids=["a pipe", "no stdin"])
def test_dlq_purge_without_a_terminal_needs_yes(
    dead_default: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: io.StringIO | None,
) -> None:
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "purge", "default"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "pass --yes to confirm (stdin is not a terminal" in err and "Traceback" not in err
    assert _dead_count(dead_default, "default") == 3
    assert main(["dlq", "purge", "default", "--yes"]) == 0
    assert "deleted 3 dead letter(s) of default" in capsys.readouterr().out
    assert _dead_count(dead_default, "default") == 0


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "no\n", "yes please\n", "ja\n"])
def test_dlq_purge_on_a_terminal_deletes_nothing_unless_the_answer_is_yes(
    dead_default: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    assert main(["dlq", "purge", "default"]) == 1
    err = capsys.readouterr().err
    assert "Delete the 3 dead letter(s) of default for good? [y/N]" in err
    assert "Nothing deleted." in err
    assert _dead_count(dead_default, "default") == 3


@pytest.mark.parametrize("answer", ["y\n", "Y\n", "yes\n", " YES \n"])
def test_dlq_purge_on_a_terminal_deletes_the_dead_letters_it_counted(
    dead_default: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
) -> None:
    """What arrives while the question waits is not deleted: the person was not told of it."""
    arrive = functools.partial(_dead_letters, dead_default, "default", 2)
    monkeypatch.setattr(sys, "stdin", _Terminal(answer, before_answer=arrive))
    assert main(["dlq", "purge", "tasker_default"]) == 0  # the PGMQ name works too
    captured = capsys.readouterr()
    assert "of tasker_default for good? [y/N]" in captured.err
    assert "deleted 3 dead letter(s)" in captured.out
    assert _dead_count(dead_default, "default") == 2


def test_dlq_purge_of_a_queue_without_dead_letters_does_not_ask(
    env: str,
    broker: PGMQBroker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker.ensure_queue(map_queue_name("default", "tasker"), create=True)
    monkeypatch.setattr(sys, "stdin", _Terminal(""))
    assert main(["dlq", "purge", "default"]) == 0
    captured = capsys.readouterr()
    assert "default has no dead letters: nothing to delete" in captured.out
    assert "[y/N]" not in captured.err


def test_dlq_purge_help_documents_yes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "purge", "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "-y, --yes delete without asking (required when stdin is not a terminal)" in out
    assert "asks y/N" in out


@pytest.mark.parametrize(("answer", "code", "left"), [(b"n\n", 1, 2), (b"y\n", 0, 0)])
def test_dlq_purge_asks_on_a_real_terminal(
    env: str, broker: PGMQBroker, answer: bytes, code: int, left: int
) -> None:
    import pty
    import select

    broker.ensure_queue(map_queue_name("default", "tasker"), create=True)
    _dead_letters(env, "default", 2)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker.cli", "dlq", "purge", "default"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    os.close(terminal)
    try:
        shown = b""
        while b"[y/N]" not in shown:
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, f"no question within 60 s: {shown!r}"
            shown += os.read(controller, 1024)
        assert b"Delete the 2 dead letter(s) of default for good?" in shown
        os.write(controller, answer)
        proc.wait(timeout=60)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == code
    assert _dead_count(env, "default") == left


@pytest.mark.slow
def test_outside_a_project_without_a_url_it_says_once_where_the_embedded_server_is(
    tmp_path: Path,
) -> None:
    """No settings file, no TASKER_DATABASE__URL: each command names the directory of the
    embedded PostgreSQL in one line (created on first use; a command that resolves the database
    twice, as the coordinator does, still says it once) and stops the server when it ends."""
    project = tmp_path / "elsewhere"
    project.mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER_")}
    env.update(PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    data_dir = project / ".tasker" / "pgdata"

    def tasker(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tasker.cli", *argv],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    try:
        first = tasker("queues")
        assert first.returncode == 1
        assert first.stderr.count(f"creating an embedded PostgreSQL in {data_dir}") == 1
        assert first.stderr.count("embedded PostgreSQL in") == 1
        assert "run `tasker db migrate`" in first.stderr and "Traceback" not in first.stderr
        assert tasker("db", "migrate").returncode == 0
        again = tasker("coordinator", "--once")
        assert again.returncode == 0, again.stderr
        assert again.stderr.count(f"Using the embedded PostgreSQL in {data_dir}") == 1
        assert again.stderr.count("embedded PostgreSQL in") == 1
        assert not (data_dir / "postmaster.pid").exists()  # stopped with its last user
    finally:
        from tasker.db.embedded import stop_embedded

        stop_embedded(data_dir)


#: Output larger than a pipe's buffer (64 KiB on Linux), so the command is still writing when
#: its reader goes away.
_MANY_NAMESPACES = [f"pool_{n}" for n in range(40)]


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "workers", *_MANY_NAMESPACES, "--modules", "myapp.flows", "--orchestration"],
        ["--help"],
        ["deploy", "workers", "--help"],
        ["settings"],
        ["queues"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_a_reader_that_stops_after_one_line_ends_the_command_quietly(
    env: str, argv: list[str]
) -> None:
    """`tasker ... | head -1`: the reader takes one line and closes the pipe while the command
    may still be writing; it ends with 141, or 0 when its output was all in the pipe before the
    reader left (some sandboxes never report a closed pipe to a writer once it was read from:
    the test above closes it before the command starts), never with a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert code in (0, EXIT_BROKEN_PIPE), err
    assert "Traceback" not in err and "Error" not in err and "Exception" not in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKER_BREAKERS__OPEN_S", "-1"),
        ("TASKER_WORKER__METRICS_PORT", "-1"),
        ("TASKER_NO_SUCH_SETTING", "1"),
        ("TASKER_COORDINATOR__STALENESS__BLOCKED_BY_FAILURES_MINUTES", "0"),
    ],
)
def test_a_worker_with_invalid_settings_refuses_to_start_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    """Before any worker process starts (docs/workers.md: exit 1, not 78)."""
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv(variable, value)
    assert main(["worker", "tests.workers.flows", "-p", "1"]) == 1
    assert _error_line(capsys).startswith("tasker: error:")

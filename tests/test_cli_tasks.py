"""``tasker task|step|templates`` end to end: real tasks run by an in-process worker, ``--json``
parsed, exit codes checked (tasker/cli_tasks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tasker
from tasker.cli import main
from tests.support import InProcessFlows

UNREACHABLE = "postgresql://root:s3cret@127.0.0.1:1/x"


def _flow(failing: set[str]) -> tasker.Workflow:
    flow = tasker.Workflow("clitest", "order", version="1.0.0", register=False)

    @flow.step()
    def validate(ctx: tasker.StepContext) -> dict[str, int]:
        return {"total": int(ctx.task_context.get("total", 5))}

    @flow.step(depends_on=["validate"], max_attempts=1)
    def charge(ctx: tasker.StepContext) -> dict[str, Any]:
        if "charge" in failing:
            raise tasker.PermanentError("card declined")
        return {"charged": ctx.parent_results["validate"]["total"]}

    @flow.step(depends_on=["charge"])
    def ship(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"shipped": ctx.parent_results["charge"]}

    return flow


@pytest.fixture
def cli(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run ``tasker ARGS`` against the test's database: ``(exit code, stdout, stderr)``."""
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", flows.url)
    monkeypatch.setenv("LOGNAME", "ops")  # the default --by: ops@<this host>

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _json(cli: Any, *argv: str, code: int = 0) -> Any:
    got, out, err = cli(*argv, "--json")
    assert got == code, err
    return json.loads(out)


def test_submit_wait_and_get_a_task_that_completes(cli: Any, flows: InProcessFlows) -> None:
    flows.start(_flow(set()))
    code, out, _ = cli("task", "submit", "clitest", "order", "--context", '{"total": 7}', "-q")
    task = out.strip()
    assert code == 0 and len(task) == 36
    status = _json(cli, "task", "wait", task, "--timeout", "30")
    assert status["state"] == "complete" and status["finished"] and not status["blocked"]
    assert [s["name"] for s in status["steps"]] == ["validate", "charge", "ship"]
    assert status["steps"][2]["result"] == {"shipped": {"charged": 7}}
    code, out, _ = cli("task", "get", task)
    assert code == 0
    assert "complete" in out and out.index("validate") < out.index("charge") < out.index("ship")


def test_a_failed_step_is_fixed_from_the_shell(cli: Any, flows: InProcessFlows) -> None:
    flows.start(_flow({"charge"}))
    code, out, err = cli("task", "submit", "clitest", "order", "--wait", "--timeout", "30")
    assert code == 6, err  # waiting in blocked_by_failures
    assert "blocked_by_failures" in out and "card declined" in out
    task = out.split()[1]
    code, out, err = cli("task", "wait", task, "--timeout", "30")
    assert code == 6 and "waiting for you" in out

    done = _json(
        cli, "step", "complete", task, "charge", "--result", '{"charged": 5}', "--reason", "phone"
    )
    assert done["step_state"] == "complete" and done["reopened"]
    status = _json(cli, "task", "wait", task, "--timeout", "30")
    assert status["state"] == "complete"
    assert status["steps"][2]["result"] == {"shipped": {"charged": 5}}
    audit = _json(cli, "task", "audit", task, "--step", "charge")
    assert audit[0]["metadata"]["action"] == "complete"
    assert audit[0]["metadata"]["by"].startswith("ops@")
    assert audit[0]["metadata"]["reason"] == "phone"


def test_retry_and_resolve_from_the_shell(cli: Any, flows: InProcessFlows) -> None:
    failing = {"charge"}
    flows.start(_flow(failing))
    task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    assert cli("task", "wait", task, "-q")[0] == 6
    failing.clear()
    code, out, err = cli("step", "retry", task, "charge", "--by", "alice", "--reason", "fixed")
    assert code == 0 and "pending" in out, err
    assert cli("task", "wait", task, "-q")[0] == 0

    failing.add("charge")
    other = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    assert cli("task", "wait", other, "-q")[0] == 6
    assert cli("step", "resolve", other, "charge")[0] == 0
    status = _json(cli, "task", "wait", other)
    assert status["state"] == "complete"
    assert status["steps"][1]["state"] == "resolved_manually"


def test_cancel_exits_5_on_wait_and_refuses_a_second_time(cli: Any, flows: InProcessFlows) -> None:
    flows.register(_flow(set()))  # no worker: the task stays queued
    task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    done = _json(cli, "task", "cancel", task, "--reason", "duplicate order")
    assert done["messages_removed"] == 1 and len(done["cancelled_steps"]) == 3
    assert cli("task", "wait", task, "-q")[0] == 5
    code, _, err = cli("task", "cancel", task)
    assert code == 1 and "cancelled already" in err
    assert err.startswith("tasker: error:") and len(err.strip().splitlines()) == 1


def test_list_pages_and_filters(cli: Any, flows: InProcessFlows) -> None:
    flows.register(_flow(set()))
    tasks = [
        cli("task", "submit", "clitest", "order", "--initiator", who, "--tag", f"n={i}", "-q")[
            1
        ].strip()
        for i, who in enumerate(["ann", "bob", "ann"])
    ]
    first = _json(cli, "task", "list", "--namespace", "clitest", "--limit", "2")
    assert [t["task_uuid"] for t in first["tasks"]] == tasks[::-1][:2]
    rest = _json(cli, "task", "list", "--namespace", "clitest", "--cursor", first["next_cursor"])
    assert [t["task_uuid"] for t in rest["tasks"]] == [tasks[0]] and rest["next_cursor"] is None
    by_ann = _json(cli, "task", "list", "--initiator", "ann")
    assert {t["task_uuid"] for t in by_ann["tasks"]} == {tasks[0], tasks[2]}
    tagged = _json(cli, "task", "list", "--tag", "n=1")
    assert [t["task_uuid"] for t in tagged["tasks"]] == [tasks[1]]
    code, out, _ = cli("task", "list", "--state", "complete")
    assert code == 0 and "(no tasks match)" in out


def test_templates_list_and_show(cli: Any, flows: InProcessFlows) -> None:
    flows.register(_flow(set()))
    rows = _json(cli, "templates", "list", "--namespace", "clitest")
    assert [(r["name"], r["version"], r["steps"]) for r in rows] == [("order", "1.0.0", 3)]
    code, out, _ = cli("templates", "show", "clitest", "order")
    assert code == 0 and "charge" in out and "validate" in out
    shown = _json(cli, "templates", "show", "clitest", "order", "--version", "1.0.0")
    assert [s["name"] for s in shown["configuration"]["steps"]] == ["validate", "charge", "ship"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["task", "get", "00000000-0000-7000-8000-000000000000"], 3, "No task"),
        (["task", "get", "not-a-uuid"], 3, "not a task id"),
        (["task", "wait", "00000000-0000-7000-8000-000000000000"], 3, "No task"),
        (["task", "cancel", "00000000-0000-7000-8000-000000000000"], 3, "No task"),
        (["step", "retry", "00000000-0000-7000-8000-000000000000", "x"], 3, "No task"),
        (["templates", "show", "clitest", "nope"], 3, "No task template"),
        (["task", "submit", "clitest", "nope"], 3, "No task template"),
        (["task", "list", "--state", "done"], 2, "state"),
        (["task", "list", "--cursor", "garbage!"], 2, "cursor"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_errors_are_one_line_with_their_exit_code(
    cli: Any, argv: list[str], code: int, message: str
) -> None:
    got, _, err = cli(*argv)
    assert got == code, err
    assert err.startswith("tasker: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_step_the_task_lacks_is_not_found(cli: Any, flows: InProcessFlows) -> None:
    flows.register(_flow(set()))
    task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    code, _, err = cli("step", "resolve", task, "nope")
    assert code == 3 and "its steps: charge, ship, validate" in err


def test_waiting_past_the_timeout_exits_4(cli: Any, flows: InProcessFlows) -> None:
    flows.register(_flow(set()))  # no worker
    task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    code, _, err = cli("task", "wait", task, "--timeout", "0.2")
    assert code == 4, err
    assert "still steps_in_process" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "submit", "a", "b", "--context", "{not json"],
        ["task", "submit", "a", "b", "--context", "[1, 2]"],
        ["task", "submit", "a", "b", "--priority", "101"],
        ["task", "submit", "a", "b", "--tag", "novalue"],
        ["task", "list", "--limit", "0"],
        ["task", "list", "--limit", "100000"],
        ["task", "list", "--since", "yesterday"],
        ["task", "wait", "x", "--timeout", "-1"],
        ["step", "complete", "t", "s"],  # --result is required
        ["step", "complete", "t", "s", "--result", "{bad"],
        ["task"],
        ["step", "explode", "t", "s"],
    ],
    ids=" ".join,
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_context_file_that_is_not_a_json_object_is_a_usage_error(
    cli: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "context.json"
    bad.write_text("[1]")
    code, _, err = cli("task", "submit", "a", "b", "--context-file", str(bad))
    assert code == 2 and "must be a JSON object" in err
    code, _, err = cli("task", "submit", "a", "b", "--context-file", str(tmp_path / "none"))
    assert code == 2 and "cannot read it" in err


def test_an_unreachable_database_exits_10(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", UNREACHABLE)
    monkeypatch.setenv("TASKER_DATABASE__TIMEOUT_S", "1")
    assert main(["task", "list"]) == 10
    err = capsys.readouterr().err
    assert "Cannot reach PostgreSQL" in err and "s3cret" not in err


# -- what a stranger tried ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "submit", "sh\udcffop", "diamond"],
        ["task", "submit", "shop", "diamond", "--version", "1\udcff"],
        ["templates", "show", "shop", "x\udcff"],
        ["templates", "list", "--namespace", "x\udcff"],
        ["task", "cancel", "00000000-0000-7000-8000-000000000000", "--by", "x\udcff"],
        ["step", "retry", "00000000-0000-7000-8000-000000000000", "s", "--reason", "x\udcff"],
    ],
    ids=lambda argv: " ".join(w.encode("utf-8", "backslashreplace").decode() for w in argv),
)
def test_arguments_that_are_not_valid_text_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates (PEP 383)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "is not valid text" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "submit", "a", "b", "--context", '{"a": NaN}'],
        ["task", "submit", "a", "b", "--context", '{"a": 1e999}'],
        ["task", "submit", "a", "b", "--context", '{"a": -Infinity}'],
        ["step", "complete", "t", "s", "--result", '{"a": NaN}'],
        ["step", "complete", "t", "s", "--result", "1e400"],
        ["step", "resolve", "t", "s", "--by", ""],
        ["step", "resolve", "t", "s", "--by", "a\nb"],
        ["step", "resolve", "t", "s", "--by", "x" * 129],
        ["task", "cancel", "t", "--reason", "x" * 2001],
        ["task", "list", "--since", "0001-01-01"],
    ],
    ids=lambda argv: " ".join(argv)[:60],
)
def test_values_postgresql_would_refuse_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_null_result_and_a_result_from_stdin_complete_a_step(
    cli: Any, flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    flows.start(_flow({"charge"}))
    for result, stdin in (("null", None), (None, '{"charged": 3}')):
        task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
        assert cli("task", "wait", task, "-q")[0] == 6
        if stdin is None:
            code, _, err = cli("step", "complete", task, "charge", "--result", str(result))
        else:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
            code, _, err = cli("step", "complete", task, "charge", "--result-file", "-")
        assert code == 0, err
        status = _json(cli, "task", "wait", task)
        expected = None if stdin is None else {"charged": 3}
        assert status["steps"][2]["result"] == {"shipped": expected}


def test_submit_wait_json_names_the_task_when_the_wait_times_out(
    cli: Any, flows: InProcessFlows
) -> None:
    flows.register(_flow(set()))  # no worker
    code, out, err = cli(
        "task", "submit", "clitest", "order", "--wait", "--json", "--timeout", "0.2"
    )
    assert code == 4 and "still steps_in_process" in err
    shown = json.loads(out)
    assert shown["created"] and not shown["settled"] and len(shown["task_uuid"]) == 36


def test_stored_text_cannot_forge_table_rows_or_redraw_the_terminal(
    cli: Any, flows: InProcessFlows
) -> None:
    flows.register(_flow(set()))
    evil = "evil\x1b[31mRED\x1b[0m\nfake row\u202e"
    task = cli(
        "task", "submit", "clitest", "order", "--initiator", evil[:40], "--reason", "r\rx", "-q"
    )[1].strip()
    assert cli("task", "cancel", task, "--reason", "line1\nline2\x1b[2J")[0] == 0
    for argv in (["task", "list"], ["task", "get", task], ["task", "audit", task]):
        code, out, _ = cli(*argv)
        assert code == 0
        assert "\x1b" not in out and "\r" not in out and "\u202e" not in out, argv
        assert "fake row" not in out.splitlines()[-1] or "\\n" in out
    assert "evil\\x1b[31mRED" in cli("task", "list")[1]


def test_task_and_step_ids_are_accepted_in_every_uuid_form(cli: Any, flows: InProcessFlows) -> None:
    flows.start(_flow({"charge"}))
    task = cli("task", "submit", "clitest", "order", "-q")[1].strip()
    assert cli("task", "wait", f"urn:uuid:{task}", "-q")[0] == 6
    status = _json(cli, "task", "get", task.upper())
    step = status["steps"][1]["step_uuid"]
    assert status["steps"][1]["name"] == "charge"
    code, _, err = cli("step", "resolve", f"urn:uuid:{task}", step.upper())
    assert code == 0, err


def test_an_unreachable_database_is_one_line_without_the_pools_retries(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", UNREACHABLE)
    monkeypatch.setenv("TASKER_DATABASE__TIMEOUT_S", "1")
    assert main(["task", "get", "00000000-0000-7000-8000-000000000000"]) == 10
    assert [r for r in caplog.records if r.name.startswith("psycopg.pool")] == []
    assert capsys.readouterr().err.count("tasker: error:") == 1


def test_a_database_that_does_not_exist_says_to_fix_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    import psycopg.conninfo

    missing = psycopg.conninfo.make_conninfo(database_url, dbname="tasker_no_such_db")
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", missing)
    monkeypatch.setenv("TASKER_DATABASE__TIMEOUT_S", "1")
    assert main(["task", "list"]) == 10
    err = capsys.readouterr().err
    assert "refused the connection" in err and "does not exist" in err

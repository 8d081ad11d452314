"""Sentry: step failures reported by the retry rule, the Dramatiq integration in workers and the
coordinator, and nothing at all without a DSN. Events are captured by a transport of the test's
own (no network), from a real worker on real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import msgspec
import pytest
import sentry_sdk
from dramatiq.message import Message
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.dramatiq import DramatiqIntegration, SentryMiddleware
from sentry_sdk.transport import Transport

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.cli import main
from tasker.engine.messages import STEP_ENQUEUE
from tasker.exceptions import ConfigurationError
from tasker.middleware.sentry import SentryStepFailures
from tasker.runtime.sentry import init_sentry
from tasker.runtime.steps import step_executor
from tasker.runtime.workflows import install
from tasker.settings import SentrySettings, Settings, load_settings, mask_dsn
from tasker.workflow.backoff import BackoffPolicy
from tests.support import ROOT, InProcessFlows, wait_for

DSN = "https://0123456789abcdef@o1.ingest.sentry.example/42"
NO_WAIT = BackoffPolicy(base_seconds=0.0, jitter=0.0)  # retries at once


class Collector(Transport):
    """Keeps the events sentry-sdk would send."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is not None:
            with self._lock:
                self._events.append(dict(event))

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("level") == "error"]


def sentry_settings(**sentry: Any) -> Settings:
    return Settings(env="test", sentry=SentrySettings(**{"dsn": DSN, **sentry}))


def _reset_sentry() -> None:
    sentry_sdk.get_client().close()
    scope = sentry_sdk.get_global_scope()
    scope.set_client(None)
    scope.remove_tag("tasker.component")


@pytest.fixture
def collector() -> Iterator[Collector]:
    """sentry-sdk initialised as a worker does it, sending to a :class:`Collector`."""
    collector = Collector()
    assert init_sentry(sentry_settings(), component="worker", transport=collector)
    yield collector
    _reset_sentry()


@pytest.fixture
def sentry_flows(collector: Collector, database_url: str) -> Iterator[InProcessFlows]:
    """An in-process worker whose broker is built after sentry-sdk, as in ``tasker.actors``."""
    broker = PGMQBroker(url=database_url, visibility_timeout_ms=5_000, poll_interval_ms=200)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    flows = InProcessFlows(broker, database_url, sentry=True)
    yield flows
    flows.stop()
    broker.close()


def run_to_the_end(flows: InProcessFlows, flow: tasker.Workflow) -> tasker.TaskStatus:
    """Run a task of ``flow``, then stop the worker: every report of its steps is made."""
    status = flows.run(flow)
    flows.stop()
    return status


def failing_flow(name: str, **step: Any) -> tasker.Workflow:
    flow = tasker.Workflow("sentry_ns", name, version="1.0.0", backoff=NO_WAIT, register=False)

    @flow.step(**step)
    def charge(ctx: tasker.StepContext) -> Any:
        return behaviour(name, ctx)

    return flow


def behaviour(name: str, ctx: tasker.StepContext) -> Any:
    if name == "permanent":
        raise tasker.PermanentError("card declined")
    if name == "payload":
        return {"not json": object()}
    if name == "flaky" and ctx.attempt <= 2:
        raise ConnectionError(f"gateway timeout on attempt {ctx.attempt}")
    if name == "exhausted":
        raise ConnectionError(f"gateway timeout on attempt {ctx.attempt}")
    return {"charged": True}


def tags(event: dict[str, Any]) -> dict[str, str]:
    return dict(event.get("tags") or {})


# -- step failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error_type", "exception_type"),
    [("permanent", "PermanentError", "PermanentError"), ("payload", "payload_error", None)],
)
def test_a_permanent_failure_is_reported_once_with_its_tags(
    sentry_flows: InProcessFlows,
    collector: Collector,
    name: str,
    error_type: str,
    exception_type: str | None,
) -> None:
    assert any(isinstance(m, SentryMiddleware) for m in sentry_flows.broker.middleware)
    flow = failing_flow(name, max_attempts=3)
    status = run_to_the_end(sentry_flows, flow)
    assert status.blocked, status
    step = status.step("charge")
    assert step.attempts == 1
    [event] = collector.errors()
    assert tags(event) == {
        "tasker.component": "worker",
        "namespace": "sentry_ns",
        "workflow": name,
        "step": "charge",
        "task_uuid": str(status.task_uuid),
        "attempt": "1",
        "error_type": error_type,
        "correlation_id": str(status.correlation_id),
    }
    assert event["contexts"]["tasker_step"]["final_because"] == "permanent error"
    assert event["contexts"]["tasker_step"]["step_uuid"] == str(step.step_uuid)
    assert event["environment"] == "test"
    [exception] = event["exception"]["values"][-1:]
    assert exception["mechanism"] == {"type": "tasker", "handled": False}
    if exception_type is not None:
        assert exception["type"] == exception_type
        assert exception["value"] == "card declined"
        frames = [frame["function"] for frame in exception["stacktrace"]["frames"]]
        assert frames[-2:] == ["charge", "behaviour"]  # the handler's own traceback


def test_retryable_failures_that_are_retried_report_no_error(
    sentry_flows: InProcessFlows, collector: Collector
) -> None:
    status = run_to_the_end(sentry_flows, failing_flow("flaky", max_attempts=3))
    assert status.state == "complete", status
    assert status.step("charge").attempts == 3
    sentry_sdk.flush()
    assert collector.events() == []


def test_a_step_that_exhausts_its_attempts_reports_one_error_on_the_last(
    sentry_flows: InProcessFlows, collector: Collector
) -> None:
    status = run_to_the_end(sentry_flows, failing_flow("exhausted", max_attempts=3))
    assert status.blocked, status
    assert status.step("charge").attempts == 3
    [event] = collector.errors()
    assert tags(event)["attempt"] == "3"
    assert tags(event)["error_type"] == "ConnectionError"
    assert event["exception"]["values"][-1]["value"] == "gateway timeout on attempt 3"
    assert event["contexts"]["tasker_step"]["final_because"] == "attempts exhausted (3/3)"
    assert collector.events() == [event]


def test_a_step_that_is_not_retryable_reports_its_first_failure(
    sentry_flows: InProcessFlows, collector: Collector
) -> None:
    status = run_to_the_end(sentry_flows, failing_flow("exhausted", retryable=False))
    assert status.blocked, status
    [event] = collector.errors()
    assert tags(event)["attempt"] == "1"
    assert event["contexts"]["tasker_step"]["final_because"] == "step is not retryable"


def test_an_orchestration_actor_error_is_reported_by_the_dramatiq_integration(
    sentry_flows: InProcessFlows, collector: Collector
) -> None:
    sentry_flows.worker.start()
    sentry_flows.broker.enqueue(
        Message(
            queue_name=STEP_ENQUEUE.queue,
            actor_name=STEP_ENQUEUE.actor,
            args=("not-a-task-uuid",),
            kwargs={},
            options={},
        )
    )
    wait_for(lambda: bool(collector.errors()), 20, "the actor's error event")
    sentry_flows.stop()
    # Dramatiq logs the error before its Sentry middleware captures it: sentry-sdk keeps the
    # first of the two (its logging integration's), inside the message's scope all the same.
    [event] = collector.errors()
    assert event["exception"]["values"][-1]["type"] == "InvalidTextRepresentation"
    assert event["contexts"]["dramatiq"]["type"] == "dramatiq"
    assert event["extra"]["dramatiq_message_id"]


# -- no DSN, no sentry-sdk -----------------------------------------------------------------------


def test_without_a_dsn_sentry_is_not_initialised(broker: PGMQBroker) -> None:
    assert init_sentry(Settings(env="test"), component="worker") is False
    assert not sentry_sdk.is_initialized()
    install(broker, sentry=False)
    assert not any(isinstance(m, SentryStepFailures) for m in broker.middleware)
    assert step_executor(broker).failure_reporter is None


def test_without_a_dsn_a_worker_does_not_even_import_sentry_sdk(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKER_", "SENTRY_"))}
    env.update(TASKER_ENV="test", TASKER_DATABASE__URL=database_url, PYTHONPATH=str(ROOT))
    code = (
        "import sys, tasker.actors; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sentry_sdk'"
        " or m == 'tasker.middleware.sentry'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_a_dsn_without_sentry_sdk_is_one_line_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # import sentry_sdk raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'tasker\[sentry\]'"):
        init_sentry(sentry_settings(), component="worker")
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    monkeypatch.setenv("TASKER_SENTRY__DSN", DSN)
    for argv, code in ((["worker", "tests.workers.actors"], 78), (["coordinator", "--once"], 1)):
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err.count("tasker: error:") == 1, err
        assert "pip install 'tasker[sentry]'" in err
        assert "Traceback" not in err


# -- the coordinator -----------------------------------------------------------------------------


def test_the_coordinator_initialises_sentry_with_the_dramatiq_integration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    collector = Collector()
    real_init = sentry_sdk.init
    monkeypatch.setattr(sentry_sdk, "init", lambda **kw: real_init(**kw | {"transport": collector}))
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    monkeypatch.setenv("TASKER_SENTRY__DSN", DSN)
    monkeypatch.setenv("TASKER_SENTRY__ENVIRONMENT", "staging")
    try:
        assert main(["coordinator", "--once"]) == 0
        client = sentry_sdk.get_client()
        assert client.is_active()
        assert client.get_integration(DramatiqIntegration) is not None
        assert client.options["environment"] == "staging"
        sentry_sdk.capture_message("hello", level="error")
        [event] = collector.errors()
        assert tags(event)["tasker.component"] == "coordinator"
    finally:
        _reset_sentry()
    assert "leader: yes" in capsys.readouterr().out


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "https://0123456789abcdef@o1.ingest.sentry.io/42",
        "http://public:secret@localhost:9000/7",
    ],
)
def test_a_valid_dsn_is_accepted(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    monkeypatch.setenv("TASKER_SENTRY__DSN", dsn)
    monkeypatch.setenv("TASKER_SENTRY__TRACES_SAMPLE_RATE", "0.25")
    settings = load_settings("test")
    assert settings.sentry.dsn == dsn
    assert settings.sentry.traces_sample_rate == 0.25


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("DSN", "s3cretkey", "must be an https:// (or http://) URL"),
        ("DSN", "ftp://s3cretkey@o1.ingest.sentry.io/42", "must be an https://"),
        ("DSN", "https://o1.ingest.sentry.io/42", "lacks its key or host"),
        ("DSN", "https://s3cretkey@o1.ingest.sentry.io/", "must end with the project's number"),
        ("DSN", "https://s3cretkey@o1.ingest.sentry.io:x/42", "is not a URL"),
        ("TRACES_SAMPLE_RATE", "1.5", "must be at least 0 and at most 1"),
        ("ENVIRONMENT", "eu/prod", "must not contain '/'"),
        ("RELEASE", "..", "must not be '..'"),
    ],
)
def test_invalid_sentry_settings_are_refused_without_quoting_the_dsn(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(f"TASKER_SENTRY__{key}", value)
    with pytest.raises(ConfigurationError) as error:
        load_settings("test")
    message = str(error.value)
    assert f"Invalid setting 'sentry.{key.lower()}'" in message
    assert problem in message
    assert f"TASKER_SENTRY__{key}" in message
    assert "s3cretkey" not in message


def test_the_defaults_are_off_and_the_shipped_file_agrees() -> None:
    shipped = load_settings("test").sentry
    assert shipped == SentrySettings()
    assert msgspec.to_builtins(shipped) == {
        "dsn": "",
        "environment": "",
        "release": "",
        "traces_sample_rate": 0.0,
    }


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        (DSN, "https://***@o1.ingest.sentry.example/42"),
        ("http://public:secret@localhost:9000/7", "http://***@localhost:9000/7"),
        ("", ""),
        ("garbage", "***"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_tasker_settings_masks_the_dsn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKER_SENTRY__DSN", "https://pubkey7:secret7@o1.ingest.sentry.io/42")
    assert main(["--env", "test", "settings"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["sentry"]["dsn"] == "https://***@o1.ingest.sentry.io/42"
    assert "pubkey7" not in out
    assert "secret7" not in out

"""The database breaker (in memory) and the shared step breakers (PostgreSQL plus a local copy):
states, listeners, log lines, and no statement on the hot path."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from tasker import readiness
from tasker.breakers import add_listener, registry, remove_listener, states
from tasker.breakers.database import DATABASE_BREAKER, DatabaseBreaker
from tasker.breakers.policy import BreakerPolicy, BreakerState
from tasker.breakers.shared import Passage, SharedBreakers
from tasker.brokers.pgmq import PGMQBroker
from tasker.cli import main
from tasker.db.connection import connect
from tasker.exceptions import ConfigurationError
from tasker.runtime.broker import database_policy
from tasker.runtime.steps import step_actors
from tasker.runtime.workflows import (
    DATABASE_BREAKER_READINESS,
    DATABASE_BREAKER_REASON,
    _breaker_changed,
    configure_breakers,
    report_breaker_states,
)
from tasker.settings import load_settings
from tests.support import reporting_readiness, scalar

OUTAGE = psycopg.OperationalError("connection to server at 127.0.0.1 failed: Connection refused")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def changes() -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    listener = seen.append

    def on_change(name: str, state: str) -> None:
        listener((name, state))

    add_listener(on_change)
    yield seen
    remove_listener(on_change)


def database_breaker(
    probe: Any, clock: Clock, name: str = "db_test", threshold: int = 3
) -> DatabaseBreaker:
    policy = BreakerPolicy(
        failure_threshold=threshold,
        window_s=30,
        open_s=5,
        half_open_successes=1,
        success_resets=True,
    )
    return DatabaseBreaker(probe, policy=policy, name=name, clock=clock)


# -- the database breaker ---------------------------------------------------------------------


def test_outages_in_a_row_open_it_and_a_probe_closes_it(
    changes: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    clock, probes = Clock(), []
    up = threading.Event()

    def probe() -> None:
        probes.append(clock.now)
        if not up.is_set():
            raise OUTAGE

    breaker = database_breaker(probe, clock)
    caplog.set_level(logging.INFO, "tasker.breakers")
    breaker.record_failure(OUTAGE)
    breaker.record_failure(OUTAGE)
    breaker.record_success()  # the database answered in between: failures count in a row
    breaker.record_failure(OUTAGE)
    breaker.record_failure(OUTAGE)
    assert breaker.allow()
    breaker.record_failure(OUTAGE)
    assert breaker.state is BreakerState.OPEN
    assert changes == [("db_test", "open")]
    assert states()["db_test"] == "open"

    assert not breaker.allow() and probes == []  # no probe inside the open window
    clock.now += 5
    assert not breaker.allow() and len(probes) == 1  # the probe failed: open again
    assert not breaker.allow() and len(probes) == 1
    clock.now += 5
    up.set()
    assert breaker.allow() and len(probes) == 2
    assert breaker.is_closed()
    assert changes[1:] == [
        ("db_test", "half_open"),
        ("db_test", "open"),
        ("db_test", "half_open"),
        ("db_test", "closed"),
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "tasker.breakers"]
    assert len(lines) == 5  # one line per change
    assert lines[0].startswith("Circuit breaker 'db_test' closed -> open: OperationalError")
    assert lines[-1] == "Circuit breaker 'db_test' half_open -> closed: the probe succeeded"


def test_races_and_refusals_are_not_outages() -> None:
    breaker = database_breaker(lambda: None, Clock(), threshold=1)
    breaker.record_failure(psycopg.errors.SerializationFailure("could not serialize"))
    breaker.record_failure(psycopg.errors.LockNotAvailable("lock timeout"))
    breaker.record_failure(psycopg.errors.UniqueViolation("duplicate key"))
    breaker.record_failure(ValueError("not a database error"))
    assert breaker.is_closed()
    breaker.record_failure(psycopg.errors.AdminShutdown("terminating connection"))
    assert not breaker.is_closed()


def test_only_one_caller_probes_and_waiters_wake_when_it_closes() -> None:
    clock = Clock()
    entered, release = threading.Event(), threading.Event()

    def slow_probe() -> None:
        entered.set()
        assert release.wait(10)

    breaker = database_breaker(slow_probe, clock, threshold=1)
    breaker.record_failure(OUTAGE)
    clock.now += 5
    results: list[bool] = []
    prober = threading.Thread(target=lambda: results.append(breaker.allow()))
    prober.start()
    assert entered.wait(10)
    assert not breaker.allow()  # a probe runs: the others wait
    waiter = threading.Thread(target=breaker.wait, args=(30,))
    waiter.start()
    release.set()
    prober.join(10)
    waiter.join(10)
    assert not waiter.is_alive() and results == [True] and breaker.probes == 1


def test_wait_returns_when_the_probe_is_due() -> None:
    clock = Clock()
    breaker = database_breaker(lambda: None, clock, threshold=1)
    breaker.record_failure(OUTAGE)
    clock.now += 5  # due now: wait must not sleep
    breaker.wait(30)  # returns at once (the test's timeout would catch a 30 s sleep)
    assert breaker.allow()


# -- the shared step breakers -----------------------------------------------------------------


class CountingConnect:
    """A ``connect`` that counts the connections it lends (every breaker statement takes one)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lent = 0

    @contextmanager
    def __call__(self) -> Iterator[psycopg.Connection[Any]]:
        self.lent += 1
        with connect(self.url) as conn:
            yield conn


POLICY = BreakerPolicy(failure_threshold=3, window_s=60, open_s=60, half_open_successes=2)


def shared(
    url: str, ttl_s: float = 3600.0, clock: Any = None
) -> tuple[SharedBreakers, CountingConnect]:
    connect_ = CountingConnect(url)
    extra = {} if clock is None else {"clock": clock}
    breakers = SharedBreakers(connect_, default=POLICY, cache_ttl_s=ttl_s, max_defer_s=60, **extra)
    return breakers, connect_


def test_a_closed_breaker_with_a_fresh_copy_costs_no_statement(database_url: str) -> None:
    breakers, lent = shared(database_url)
    breakers.register("payments")
    first = breakers.enter("payments")  # the first use reads the rows once
    assert first == Passage("payments", run=True)
    assert lent.lent == 1
    for _ in range(200):
        passage = breakers.enter("payments")
        assert passage.run
        breakers.leave(passage, failed=False)  # a success while closed writes nothing
        breakers.leave(passage, failed=None)
    assert lent.lent == 1
    assert scalar(database_url, "SELECT count(*) FROM tasker.circuit_breakers") == 0


def test_the_copy_is_read_again_once_per_ttl(database_url: str) -> None:
    clock = Clock()
    breakers, lent = shared(database_url, ttl_s=1.0, clock=clock)
    breakers.register("payments")
    breakers.register("inventory")
    breakers.enter("payments")
    assert lent.lent == 1
    clock.now += 0.9
    breakers.enter("payments")
    breakers.enter("inventory")
    assert lent.lent == 1
    clock.now += 0.2  # older than the TTL: one statement reads both breakers again
    breakers.enter("payments")
    breakers.enter("inventory")
    assert lent.lent == 2


def test_failures_of_one_process_open_it_for_another(
    database_url: str, changes: list[tuple[str, str]]
) -> None:
    a, _ = shared(database_url)
    b, _ = shared(database_url, ttl_s=0.0)  # b reads on every step, to see a's writes now
    for process in (a, b):
        process.register("gateway")
    for _ in range(3):
        passage = a.enter("gateway")
        assert passage.run
        a.leave(passage, failed=True, error="TimeoutError")
    assert ("gateway", "open") in changes
    row = scalar(database_url, "SELECT state FROM tasker.circuit_breakers WHERE name='gateway'")
    assert row == "open"
    refused = b.enter("gateway")
    assert not refused.run
    assert 54 <= refused.wait_s <= 60 * 1.1 + 0.01  # until the window ends, jittered
    assert (
        scalar(database_url, "SELECT last_error FROM tasker.circuit_breakers WHERE name='gateway'")
        == "TimeoutError"
    )


def test_half_open_trials_close_it_across_processes(database_url: str) -> None:
    a, _ = shared(database_url, ttl_s=0.0)
    b, _ = shared(database_url, ttl_s=0.0)
    for _ in range(3):
        a.leave(a.enter("gateway"), failed=True, error="RuntimeError")
    with connect(database_url) as conn:  # the open window ends now
        conn.execute(
            "UPDATE tasker.circuit_breakers SET open_until = clock_timestamp() "
            "WHERE name = 'gateway'"
        )
    trial = a.enter("gateway")
    assert trial.run and trial.trial is not None
    assert not b.enter("gateway").run  # one trial at a time, whoever asks
    a.leave(trial, failed=False)
    second = b.enter("gateway")
    assert second.run and second.trial is not None
    b.leave(second, failed=False)
    assert (
        scalar(
            database_url,
            "SELECT state || ' ' || times_opened FROM tasker.circuit_breakers WHERE name='gateway'",
        )
        == "closed 1"
    )
    assert a.enter("gateway").run


def test_a_failed_trial_opens_it_again_and_no_verdict_frees_the_slot(database_url: str) -> None:
    a, _ = shared(database_url, ttl_s=0.0)
    for _ in range(3):
        a.leave(a.enter("gateway"), failed=True, error="RuntimeError")
    reopen = (
        "UPDATE tasker.circuit_breakers SET open_until = clock_timestamp() WHERE name = 'gateway'"
    )
    with connect(database_url) as conn:
        conn.execute(reopen)
    trial = a.enter("gateway")
    a.leave(trial, failed=None)  # e.g. a payload error: says nothing about the gateway
    trial = a.enter("gateway")
    assert trial.run
    a.leave(trial, failed=True, error="RuntimeError")
    assert (
        scalar(
            database_url,
            "SELECT state || ' ' || times_opened FROM tasker.circuit_breakers WHERE name='gateway'",
        )
        == "open 2"
    )


def test_database_trouble_never_fails_a_step() -> None:
    def unreachable() -> Any:
        raise psycopg.OperationalError("no route to host")

    breakers = SharedBreakers(unreachable, default=POLICY)
    passage = breakers.enter("payments")
    assert passage.run  # no copy could be read: closed, as far as anyone knows
    breakers.leave(passage, failed=True, error="RuntimeError")  # logged, not raised


def test_the_registry_survives_a_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, state: str) -> None:
        raise RuntimeError("listener bug")

    add_listener(broken)
    try:
        registry.note_state("listener_test", BreakerState.OPEN, "test")
    finally:
        remove_listener(broken)
        registry.note_state("listener_test", BreakerState.CLOSED, "test")
    assert "A circuit breaker listener failed" in caplog.text


# -- metrics and readiness ---------------------------------------------------------------------


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("tasker_circuit_breaker_state", {"breaker": name})


@pytest.fixture
def reported(tmp_path: Any) -> Iterator[Callable[[], bool]]:
    """The breakers' reports wired as a worker's boot wires them, and this process reporting
    its readiness to a file; every breaker the test moves is closed again afterwards."""
    report_breaker_states()  # once per process: install() may have done it already
    try:
        with reporting_readiness(tmp_path) as pod_ready:
            yield pod_ready
    finally:
        for name in (DATABASE_BREAKER, "unit_gateway"):
            registry.note_state(name, BreakerState.CLOSED, "test")


def test_a_state_change_sets_the_gauge_and_the_database_breaker_the_readiness(
    reported: Callable[[], bool],
) -> None:
    def not_ready() -> dict[str, str]:
        return dict(readiness.process_status().not_ready)

    assert reported()
    registry.note_state(DATABASE_BREAKER, BreakerState.OPEN, "test outage")
    assert gauge(DATABASE_BREAKER) == 1
    assert not_ready() == {DATABASE_BREAKER_READINESS: DATABASE_BREAKER_REASON}
    assert not reported()  # the pod's /health/ready: 503
    registry.note_state(DATABASE_BREAKER, BreakerState.HALF_OPEN, "probing")
    assert gauge(DATABASE_BREAKER) == 2
    assert not reported()
    registry.note_state(DATABASE_BREAKER, BreakerState.CLOSED, "the probe succeeded")
    assert gauge(DATABASE_BREAKER) == 0
    assert not_ready() == {}
    assert reported()
    # A step breaker has its gauge, and leaves the readiness alone: the worker can run others.
    registry.note_state("unit_gateway", BreakerState.OPEN, "step failed")
    assert gauge("unit_gateway") == 1
    assert reported()
    registry.note_state("unit_gateway", BreakerState.CLOSED, "trial steps succeeded")
    assert gauge("unit_gateway") == 0


def test_a_late_listener_call_exports_the_latest_state(reported: Callable[[], bool]) -> None:
    """Two threads may announce their changes out of order: the export follows the registry."""
    registry.note_state(DATABASE_BREAKER, BreakerState.OPEN, "test outage")
    registry.note_state(DATABASE_BREAKER, BreakerState.CLOSED, "the probe succeeded")
    _breaker_changed(DATABASE_BREAKER, "open")  # the opening thread's listeners, late
    assert gauge(DATABASE_BREAKER) == 0
    assert reported()


# -- tasker breakers ----------------------------------------------------------------------------


def test_tasker_breakers_lists_and_resets(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    monkeypatch.setenv("TASKER_DATABASE__URL", database_url)
    assert main(["breakers"]) == 0
    assert "every step breaker is closed" in capsys.readouterr().out
    a, _ = shared(database_url, ttl_s=0.0)
    for _ in range(3):
        a.leave(a.enter("gateway"), failed=True, error="ConnectionError")
    assert main(["breakers", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["state"], row["times_opened"]) == ("gateway", "open", 1)
    assert 0 < row["open_for_s"] <= 60 and row["last_error"] == "ConnectionError"
    assert main(["breakers"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["gateway", "open", "0"]
    assert main(["breakers", "reset", "gateway"]) == 0
    assert "breaker gateway closed" in capsys.readouterr().out
    assert a.enter("gateway").run
    assert main(["breakers", "reset", "nope"]) == 1
    assert "No circuit breaker 'nope'" in capsys.readouterr().err
    for name, why in (("database", "each worker process"), ("Bad Name", "lower-case")):
        with pytest.raises(SystemExit) as exited:
            main(["breakers", "reset", name])
        assert exited.value.code == 2 and why in capsys.readouterr().err


# -- settings ------------------------------------------------------------------------------------


def breaker_settings(tmp_path: Any, text: str) -> Any:
    path = tmp_path / "settings.toml"
    path.write_text("[default.database]\nurl = 'postgresql://db/app'\n" + text)
    return load_settings("production", settings_file=path)


def test_overrides_apply_to_one_breaker_and_the_database_breaker_has_its_own(
    tmp_path: Any, database_url: str
) -> None:

    settings = breaker_settings(
        tmp_path,
        "[default.breakers]\nopen_s = 10.0\n"
        "[default.breakers.database]\nopen_s = 2.0\n"
        "[default.breakers.overrides.payments]\nopen_s = 120.0\nhalf_open_successes = 3\n",
    )
    broker = PGMQBroker(url=database_url, database_policy=database_policy(settings))
    try:
        configure_breakers(broker, settings.breakers)
        breakers = step_actors(broker).breakers
        assert breakers.policy("payments") == BreakerPolicy(open_s=120.0, half_open_successes=3)
        assert breakers.policy("inventory") == BreakerPolicy(open_s=10.0)
        assert broker.database_breaker.policy.open_s == 2.0
        assert broker.database_breaker.policy.success_resets
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[default.breakers]\nopen_s = 0\n", "breakers.open_s.*greater than 0"),
        ("[default.breakers]\nhalf_open_trials = 0\n", "breakers.half_open_trials.*at least 1"),
        ("[default.breakers.database]\nfailure_threshold = 0\n", "database.failure_threshold"),
        (
            "[default.breakers.overrides.payments]\nwindow_s = -1\n",
            "breakers.overrides.payments.window_s.*greater than 0",
        ),
        ("[default.breakers.overrides.database]\nopen_s = 1\n", "must name a step breaker"),
        ("[default.breakers.overrides.payments]\nopen = 1\n", "Unknown setting"),
    ],
)
def test_bad_breaker_settings_are_refused(tmp_path: Any, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        breaker_settings(tmp_path, text)

"""The circuit breaker's rule (tasker/breakers/policy.py), pure: examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasker.breakers.policy import (
    BreakerPolicy,
    BreakerState,
    Circuit,
    admit,
    record_failure,
    record_success,
    release,
)
from tasker.exceptions import ConfigurationError

SEED = BreakerPolicy()  # 5 failures within 30 s, open 30 s, 2 successes, 1 trial at a time
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def fail_at(circuit: Circuit, *times: float, policy: BreakerPolicy = SEED) -> Circuit:
    for t in times:
        circuit = record_failure(policy, circuit, t)
    return circuit


def test_the_seed_defaults() -> None:
    assert (SEED.failure_threshold, SEED.window_s, SEED.open_s) == (5, 30.0, 30.0)
    assert (SEED.half_open_successes, SEED.half_open_trials) == (2, 1)


def test_five_failures_within_the_window_open_it_even_with_successes_between() -> None:
    circuit = Circuit()
    for t in (0.0, 1.0, 2.0, 3.0):
        circuit = record_failure(SEED, circuit, t)
        assert record_success(SEED, circuit, t + 0.5) is circuit  # a success changes nothing
    assert circuit.state is CLOSED
    opened = record_failure(SEED, circuit, 4.0)
    assert opened.state is OPEN and opened.open_until == 34.0 and opened.times_opened == 1


def test_failures_older_than_the_window_do_not_count() -> None:
    circuit = fail_at(Circuit(), 0.0, 10.0, 20.0, 29.0)
    assert fail_at(circuit, 31.0).state is CLOSED  # the failure at 0 left the window
    assert fail_at(circuit, 29.5).state is OPEN


def test_closed_keeps_at_most_threshold_failures() -> None:
    policy = BreakerPolicy(failure_threshold=3, window_s=1.0)
    circuit = Circuit()
    for t in range(50):  # one failure a second: never 3 within a second
        circuit = record_failure(policy, circuit, float(t))
        assert circuit.state is CLOSED
        assert len(circuit.failures) <= 3


def test_open_refuses_until_its_window_ends_then_one_trial_at_a_time() -> None:
    circuit = fail_at(Circuit(), 0, 1, 2, 3, 4)
    waiting = admit(SEED, circuit, 10.0, "a")
    assert not waiting.run and waiting.wait_s == pytest.approx(24.0)
    assert waiting.circuit is circuit  # nothing to write
    first = admit(SEED, circuit, 34.0, "a")
    assert first.run and first.trial == "a" and first.circuit.state is HALF_OPEN
    second = admit(SEED, first.circuit, 34.5, "b")
    assert not second.run and second.wait_s == pytest.approx(29.5)  # until a's slot lapses


def test_two_successes_close_it_and_a_failure_reopens_it() -> None:
    opened = fail_at(Circuit(), 0, 1, 2, 3, 4)
    trial = admit(SEED, opened, 40.0, "a").circuit
    once = record_success(SEED, trial, 40.1, "a")
    assert once.state is HALF_OPEN and once.successes == 1 and once.trials == ()
    again = admit(SEED, once, 40.2, "b").circuit
    closed = record_success(SEED, again, 40.3, "b")
    assert closed == Circuit(times_opened=1)
    reopened = record_failure(SEED, again, 40.3, "b")
    assert reopened.state is OPEN and reopened.open_until == pytest.approx(70.3)
    assert reopened.times_opened == 2


def test_a_trial_without_verdict_frees_its_slot() -> None:
    opened = fail_at(Circuit(), 0, 1, 2, 3, 4)
    trial = admit(SEED, opened, 40.0, "a").circuit
    freed = release(trial, "a")
    assert freed.trials == () and freed.state is HALF_OPEN
    assert release(freed, "a") is freed
    assert admit(SEED, freed, 40.1, "b").run


def test_a_failure_while_open_changes_nothing() -> None:
    opened = fail_at(Circuit(), 0, 1, 2, 3, 4)
    assert record_failure(SEED, opened, 10.0) is opened
    assert record_success(SEED, opened, 10.0) is opened


def test_a_trial_slot_lapses_after_the_open_window() -> None:
    opened = fail_at(Circuit(), 0, 1, 2, 3, 4)
    held = admit(SEED, opened, 40.0, "a").circuit
    assert not admit(SEED, held, 69.9, "b").run
    assert admit(SEED, held, 70.1, "b").run  # "a" never reported back


def test_success_resets_makes_failures_count_in_a_row() -> None:
    policy = BreakerPolicy(failure_threshold=3, success_resets=True)
    circuit = fail_at(Circuit(), 0, 1, policy=policy)
    circuit = record_success(policy, circuit, 1.5)
    assert circuit.failures == ()
    assert fail_at(circuit, 2, 3, policy=policy).state is CLOSED
    assert fail_at(circuit, 2, 3, 4, policy=policy).state is OPEN


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"failure_threshold": True},
        {"window_s": 0},
        {"open_s": float("nan")},
        {"open_s": 86_401},
        {"half_open_trials": 1.5},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="Breaker"):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------------------

Event = tuple[str, float]  # ("fail" | "ok" | "admit" | "release", seconds since the last event)
events = st.lists(
    st.tuples(
        st.sampled_from(["fail", "ok", "admit", "release"]),
        st.floats(min_value=0.0, max_value=20.0, allow_nan=False),
    ),
    max_size=60,
)
policies = st.builds(
    BreakerPolicy,
    failure_threshold=st.integers(1, 6),
    window_s=st.floats(0.5, 60.0),
    open_s=st.floats(0.5, 60.0),
    half_open_successes=st.integers(1, 3),
    half_open_trials=st.integers(1, 3),
)


def run(policy: BreakerPolicy, script: list[Event]) -> list[tuple[str, float, Circuit, Circuit]]:
    """Apply the script; each step as (event, time, before, after)."""
    circuit, now, tokens, trace = Circuit(), 0.0, [], []
    for n, (event, gap) in enumerate(script):
        now += gap
        before = circuit
        if event == "fail":
            circuit = record_failure(policy, circuit, now, tokens.pop() if tokens else None)
        elif event == "ok":
            circuit = record_success(policy, circuit, now, tokens.pop() if tokens else None)
        elif event == "admit":
            admission = admit(policy, circuit, now, str(n))
            circuit = admission.circuit
            if admission.trial:
                tokens.append(admission.trial)
        elif tokens:
            circuit = release(circuit, tokens.pop())
        trace.append((event, now, before, circuit))
    return trace


@settings(max_examples=300, deadline=None)
@given(policies, events)
def test_invariants_hold_for_any_history(policy: BreakerPolicy, script: list[Event]) -> None:
    for event, now, before, after in run(policy, script):
        assert len(after.failures) < policy.failure_threshold or after.state is not CLOSED
        assert len(after.trials) <= policy.half_open_trials
        assert after.successes < policy.half_open_successes
        assert after.times_opened >= before.times_opened
        if after.state is CLOSED:
            assert after.trials == () and after.successes == 0
        if event == "ok" and before.state is CLOSED:
            assert after == before  # a success while closed never writes
        if after.state is OPEN and before.state is not OPEN:
            assert event == "fail" and after.open_until == now + policy.open_s


@settings(max_examples=300, deadline=None)
@given(policies, events)
def test_it_opens_exactly_when_threshold_failures_fall_in_the_window(
    policy: BreakerPolicy, script: list[Event]
) -> None:
    """While closed, the circuit opens on a failure iff, counting the failures since it last
    closed, threshold of them lie within window_s of this one."""
    since_closed: list[float] = []
    for event, now, before, after in run(policy, script):
        if before.state is not CLOSED:
            since_closed = []
            continue
        if event != "fail":
            continue
        since_closed.append(now)
        recent = [t for t in since_closed if t > now - policy.window_s or t == now]
        assert (after.state is OPEN) == (len(recent) >= policy.failure_threshold)
        if after.state is OPEN:
            since_closed = []

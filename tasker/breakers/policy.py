"""The circuit breaker's rule, pure: immutable states in, immutable states out.

A :class:`Circuit` is a breaker's whole state; :func:`admit`, :func:`record_failure`,
:func:`record_success` and :func:`release` compute the next one at a given time (seconds, on any
clock that only moves forward). They never read a clock, a database or a setting: the
per-process database breaker (:mod:`tasker.breakers.database`) keeps a circuit in memory, the
shared step breakers (:mod:`tasker.breakers.shared`) keep one per name in PostgreSQL, and both
persist exactly what these functions return. A function that changes nothing returns its input,
so ``new == old`` tells the caller there is nothing to write.

The rule (seed-spec 7.5, with a rolling window instead of consecutive failures):

* **closed**: everything runs. A failure is remembered with its time; once
  ``failure_threshold`` failures fall within the last ``window_s`` seconds, the circuit opens. A
  success changes nothing (so a shared breaker writes nothing on the hot path), unless
  ``success_resets`` (a breaker in memory, where forgetting costs nothing: consecutive failures).
* **open** until ``open_until`` (``open_s`` after it opened): nothing runs.
* **half-open** after that: at most ``half_open_trials`` trials run at once, each holding a slot
  (a token) for at most ``open_s`` seconds; ``half_open_successes`` successes close the circuit,
  one failure opens it again. An open circuit whose window has passed counts as half-open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

from tasker.exceptions import ConfigurationError

__all__ = [
    "DEFAULT_POLICY",
    "Admission",
    "BreakerPolicy",
    "BreakerState",
    "Circuit",
    "admit",
    "record_failure",
    "record_success",
    "release",
]


class BreakerState(StrEnum):
    """The three states of a circuit breaker, as stored and as passed to listeners."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens, for how long, and what closes it (see the module docstring)."""

    failure_threshold: int = 5
    window_s: float = 30.0
    open_s: float = 30.0
    half_open_successes: int = 2
    half_open_trials: int = 1
    success_resets: bool = False

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "half_open_successes", "half_open_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ConfigurationError(
                    f"Breaker {name} must be a whole number from 1 to 1000, got {value!r}."
                )
        for name in ("window_s", "open_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0 < value <= 86_400
            ):
                raise ConfigurationError(
                    f"Breaker {name} must be a number of seconds above 0 and at most 86400 "
                    f"(a day), got {value!r}."
                )


#: The seed's defaults: 5 failures (within 30 s), open for 30 s, 2 successes to close.
DEFAULT_POLICY = BreakerPolicy()


@dataclass(frozen=True)
class Circuit:
    """One breaker's state. Times are seconds on the caller's clock.

    ``failures``: times of the recent failures (closed only, at most ``failure_threshold``);
    ``open_until``: end of the open window; ``successes``: successes since it went half-open;
    ``trials``: the half-open trial slots taken, as ``(token, held_until)`` pairs;
    ``times_opened``: how often it opened, for operators.
    """

    state: BreakerState = BreakerState.CLOSED
    failures: tuple[float, ...] = ()
    open_until: float = 0.0
    successes: int = 0
    trials: tuple[tuple[str, float], ...] = ()
    times_opened: int = 0

    def is_half_open(self, now: float) -> bool:
        """Half-open, or open with its window passed (the next admission makes it half-open)."""
        return self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.OPEN and now >= self.open_until
        )


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` decided: run (``trial`` names the slot taken, if one was) or wait
    ``wait_s`` seconds; ``circuit`` is the new state."""

    run: bool
    circuit: Circuit
    wait_s: float = 0.0
    trial: str | None = None


def _opened(policy: BreakerPolicy, circuit: Circuit, now: float) -> Circuit:
    return Circuit(
        BreakerState.OPEN,
        open_until=now + policy.open_s,
        times_opened=circuit.times_opened + 1,
    )


def _half_open(circuit: Circuit, now: float) -> Circuit:
    """``circuit`` as half-open, without the trial slots whose time ran out."""
    if circuit.state is BreakerState.OPEN:
        return replace(circuit, state=BreakerState.HALF_OPEN, successes=0, trials=())
    live = tuple(trial for trial in circuit.trials if trial[1] > now)
    return circuit if live == circuit.trials else replace(circuit, trials=live)


def admit(policy: BreakerPolicy, circuit: Circuit, now: float, token: str) -> Admission:
    """May a call run now? Half-open, it runs as a trial holding slot ``token``."""
    if circuit.state is BreakerState.CLOSED:
        return Admission(True, circuit)
    if not circuit.is_half_open(now):
        return Admission(False, circuit, wait_s=circuit.open_until - now)
    half = _half_open(circuit, now)
    if len(half.trials) >= policy.half_open_trials:
        soonest = min(until for _, until in half.trials)
        return Admission(False, half, wait_s=soonest - now)
    taken = replace(half, trials=(*half.trials, (token, now + policy.open_s)))
    return Admission(True, taken, trial=token)


def record_failure(
    policy: BreakerPolicy, circuit: Circuit, now: float, token: str | None = None
) -> Circuit:
    """A call failed: remembered while closed (opening at the threshold), re-opens a half-open
    circuit, changes nothing while open (a call admitted before it opened)."""
    if circuit.state is BreakerState.CLOSED:
        recent = (*(t for t in circuit.failures if t > now - policy.window_s), now)
        if len(recent) >= policy.failure_threshold:
            return _opened(policy, circuit, now)
        return replace(circuit, failures=recent[-policy.failure_threshold :])
    if circuit.is_half_open(now):
        return _opened(policy, circuit, now)
    return circuit


def record_success(
    policy: BreakerPolicy, circuit: Circuit, now: float, token: str | None = None
) -> Circuit:
    """A call succeeded: counts toward closing a half-open circuit; changes nothing otherwise
    (with ``success_resets``, a closed circuit forgets its failures)."""
    if circuit.state is BreakerState.CLOSED:
        if policy.success_resets and circuit.failures:
            return replace(circuit, failures=())
        return circuit
    if not circuit.is_half_open(now):
        return circuit
    half = _half_open(circuit, now)
    successes = half.successes + 1
    if successes >= policy.half_open_successes:
        return Circuit(times_opened=circuit.times_opened)
    trials = tuple(trial for trial in half.trials if trial[0] != token)
    return replace(half, successes=successes, trials=trials)


def release(circuit: Circuit, token: str) -> Circuit:
    """A trial ended without a verdict (nothing ran, or the outcome says nothing about the
    downstream): its slot is free again."""
    trials = tuple(trial for trial in circuit.trials if trial[0] != token)
    return circuit if trials == circuit.trials else replace(circuit, trials=trials)

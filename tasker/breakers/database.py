"""The database breaker: one per broker, in the memory of its process.

Its state cannot live in the database it protects. Consumers and the step executor report their
database errors (:meth:`DatabaseBreaker.record_failure`; only outages count, see
:func:`tasker.db.errors.is_outage`) and their successes. After ``failure_threshold`` outage errors
in a row (within ``window_s``) it opens: consumers stop claiming and wait, and the executor waits
before a claim or a record instead of retrying on its own. After ``open_s`` one caller runs the
probe (a ``SELECT 1``); its success closes the breaker, its failure opens it for another
``open_s``. Messages are never acknowledged or dead-lettered because of an outage: they stay in
their queues (and a leased one comes back when its lease runs out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tasker.breakers import registry
from tasker.breakers.policy import (
    BreakerPolicy,
    BreakerState,
    Circuit,
    admit,
    record_failure,
    record_success,
)
from tasker.db.errors import is_outage, redact

__all__ = [
    "DATABASE_BREAKER",
    "DEFAULT_DATABASE_POLICY",
    "DatabaseBreaker",
]

logger = logging.getLogger(__name__)

#: The name the database breaker reports to listeners (:mod:`tasker.breakers.registry`).
DATABASE_BREAKER = "database"
#: 5 outage errors in a row open it; a probe every 5 s; one successful probe closes it.
DEFAULT_DATABASE_POLICY = BreakerPolicy(
    failure_threshold=5,
    window_s=30.0,
    open_s=5.0,
    half_open_successes=1,
    half_open_trials=1,
    success_resets=True,
)
_PROBE = "probe"


class DatabaseBreaker:
    """The database breaker of one broker (see the module docstring); thread-safe.

    ``probe`` runs the cheap statement that proves the database is back (raises if it is not).
    ``policy.success_resets`` should stay true: a success in memory costs nothing, so failures
    count only in a row.
    """

    def __init__(
        self,
        probe: Callable[[], object],
        *,
        policy: BreakerPolicy = DEFAULT_DATABASE_POLICY,
        name: str = DATABASE_BREAKER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy
        self._probe = probe
        self._clock = clock
        self.reset()
        registry.register(name)

    def reset(self) -> None:
        """Start closed, with a new lock (after a fork: the parent's may have been held)."""
        self.probes = 0  # probes run, for tests and diagnostics
        self._circuit = Circuit()
        self._changed = threading.Condition()

    @property
    def state(self) -> BreakerState:
        return self._circuit.state

    def is_closed(self) -> bool:
        return self._circuit.state is BreakerState.CLOSED

    def record_failure(self, exc: BaseException) -> None:
        """Count ``exc`` if it is an outage (any other error says the server answered)."""
        if is_outage(exc):
            self._update(record_failure, f"{type(exc).__name__}: {_first_line(exc)}")

    def record_success(self) -> None:
        """The database answered."""
        circuit = self._circuit
        if circuit.state is BreakerState.CLOSED and not circuit.failures:
            return  # the hot path: nothing to forget, no lock taken
        self._update(record_success, "the database answered")

    def allow(self) -> bool:
        """True when the database may be used now. Once the open window has passed, the first
        caller runs the probe (the others get False meanwhile) and gets its verdict."""
        if self._circuit.state is BreakerState.CLOSED:
            return True
        with self._changed:
            decision = admit(self.policy, self._circuit, self._clock(), _PROBE)
            change = self._keep(decision.circuit)
        self._announce(change, "probing the database")
        if not decision.run:
            return False
        self.probes += 1
        try:
            self._probe()
        except Exception as exc:
            self._update(record_failure, f"the probe failed: {_first_line(exc)}")
            return False
        self._update(record_success, "the probe succeeded")
        return True

    def wait(self, timeout_s: float) -> None:
        """Sleep until the breaker may let a caller through (its probe is due, or it changed
        state), at most ``timeout_s`` seconds."""
        with self._changed:
            circuit = self._circuit
            now = self._clock()
            if circuit.state is BreakerState.CLOSED:
                return
            due = timeout_s if circuit.is_half_open(now) else circuit.open_until - now
            if due > 0:
                self._changed.wait(min(timeout_s, due))

    def _update(
        self, change: Callable[[BreakerPolicy, Circuit, float, str | None], Circuit], why: str
    ) -> None:
        with self._changed:
            changed = self._keep(change(self.policy, self._circuit, self._clock(), _PROBE))
        self._announce(changed, why)

    def _keep(self, circuit: Circuit) -> BreakerState | None:
        """Keep ``circuit`` (under the lock); its new state if that changed, else None."""
        before = self._circuit
        self._circuit = circuit
        if circuit.state is before.state:
            return None
        self._changed.notify_all()
        return circuit.state

    def _announce(self, state: BreakerState | None, why: str) -> None:
        if state is not None:
            registry.note_state(self.name, state, why)


def _first_line(exc: BaseException) -> str:
    text = redact(str(exc).strip(), None)
    return text.splitlines()[0][:200] if text else type(exc).__name__

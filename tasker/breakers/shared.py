"""Step breakers shared by every worker process through PostgreSQL (``tasker.circuit_breakers``).

A step declared with ``breaker="payments"`` passes :meth:`SharedBreakers.enter` before its claim
and reports its outcome to :meth:`SharedBreakers.leave` after its handler ran. The state of each
breaker lives in one row, changed under a row lock by the pure rule of
:mod:`tasker.breakers.policy`, so one process's failures open the breaker for all of them.

The hot path costs nothing: each process reads the rows of the breakers it knows at most once per
``cache_ttl_s`` (one statement for all of them) and decides from that copy. A closed breaker with
a fresh copy admits a step without any statement, and a success while closed writes nothing. A
failure, a half-open trial (taking a slot, reporting its verdict) and a state change write the
row. An open breaker defers the step until its window ends (at most ``max_defer_s`` at a time,
so a breaker closed by hand frees its steps soon), with a little jitter so that the deferred
messages do not all come back at the same instant.

Database trouble while reading or writing a breaker never fails a step: the last copy is used,
and the step's own claim and record meet the trouble (and the database breaker) anyway.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row, dict_row

from tasker.breakers import registry
from tasker.breakers.policy import (
    DEFAULT_POLICY,
    Admission,
    BreakerPolicy,
    BreakerState,
    Circuit,
    admit,
    record_failure,
    record_success,
    release,
)
from tasker.db.queries import load_queries

__all__ = [
    "DEFAULT_CACHE_TTL_S",
    "DEFAULT_MAX_DEFER_S",
    "BreakerRow",
    "Passage",
    "SharedBreakers",
    "circuit_from_row",
    "list_breakers",
    "reset_breaker",
]

logger = logging.getLogger(__name__)

#: Seconds a process trusts its copy of a breaker's row.
DEFAULT_CACHE_TTL_S = 1.0
#: Longest deferral of a step by an open breaker, in seconds.
DEFAULT_MAX_DEFER_S = 30.0
#: How soon a step deferred because the half-open trial slots are taken comes back.
_HALF_OPEN_RECHECK_S = 1.0
_MIN_DEFER_S = 0.05
_JITTER = 0.1

Connect = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Passage:
    """What :meth:`SharedBreakers.enter` decided for one delivery: ``run`` it (as a half-open
    trial holding slot ``trial``, if set), or defer it ``wait_s`` seconds."""

    name: str
    run: bool
    wait_s: float = 0.0
    trial: str | None = None


@dataclass(frozen=True)
class _Copy:
    """A breaker's row as read at local time ``read_at`` (monotonic), when the database's
    clock said ``db_now``."""

    circuit: Circuit
    db_now: float
    read_at: float

    def now(self, local: float) -> float:
        """The database's clock at local time ``local``."""
        return self.db_now + (local - self.read_at)


#: The copy of a breaker this process knows but has not read yet.
_UNREAD = _Copy(Circuit(), 0.0, float("-inf"))


def circuit_from_row(row: Mapping[str, Any]) -> Circuit:
    """The :class:`Circuit` of a ``tasker.circuit_breakers`` row (None columns: closed)."""
    if row.get("state") is None:
        return Circuit()
    trials = row.get("trials") or {}
    if isinstance(trials, str):
        trials = json.loads(trials)
    return Circuit(
        state=BreakerState(row["state"]),
        failures=tuple(float(t) for t in row.get("failures") or ()),
        open_until=float(row.get("open_until") or 0.0),
        successes=int(row.get("half_open_successes") or 0),
        trials=tuple(sorted((str(k), float(v)) for k, v in trials.items())),
        times_opened=int(row.get("times_opened") or 0),
    )


class SharedBreakers:
    """The step breakers of one worker process (see the module docstring); thread-safe.

    Parameters:
      connect: lends a connection (a pool's ``connection``).
      default: the policy of every breaker without an override.
      overrides: policies by breaker name.
      cache_ttl_s: how long a copy of the rows is trusted.
      max_defer_s: the longest deferral at a time.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        default: BreakerPolicy = DEFAULT_POLICY,
        overrides: Mapping[str, BreakerPolicy] | None = None,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        max_defer_s: float = DEFAULT_MAX_DEFER_S,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect = connect
        self.default = default
        self.overrides = dict(overrides or {})
        self.cache_ttl_s = cache_ttl_s
        self.max_defer_s = max_defer_s
        self.statements = 0  # statements run, for tests and diagnostics
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._copies: dict[str, _Copy] = {}
        self._sql = load_queries("breakers")

    def policy(self, name: str) -> BreakerPolicy:
        """The policy of breaker ``name``."""
        return self.overrides.get(name, self.default)

    def register(self, name: str) -> None:
        """Know breaker ``name`` (a step of this process declares it): read with the others."""
        registry.register(name)
        with self._lock:
            self._copies.setdefault(name, _UNREAD)

    # -- the step's way through -------------------------------------------------------------

    def enter(self, name: str) -> Passage:
        """May a step of breaker ``name`` run now? Closed with a fresh copy: yes, with no
        statement. Open: defer. Half-open: run if a trial slot is free (taken in the database)."""
        copy = self._fresh(name)
        if copy.circuit.state is BreakerState.CLOSED:
            return Passage(name, run=True)
        policy = self.policy(name)
        token = uuid.uuid4().hex
        local = admit(policy, copy.circuit, copy.now(self._clock()), token)
        if not local.run:
            return self._defer(name, local)
        decided: list[Admission] = []

        def take_slot(circuit: Circuit, now: float) -> Circuit:
            decided.append(admit(policy, circuit, now, token))
            return decided[-1].circuit

        if not self._change(name, take_slot, why="trial steps may run") or not decided:
            return Passage(name, run=False, wait_s=self._jittered(_HALF_OPEN_RECHECK_S))
        admission = decided[-1]
        if admission.run:
            return Passage(name, run=True, trial=admission.trial)
        return self._defer(name, admission)

    def leave(self, passage: Passage, *, failed: bool | None, error: str | None = None) -> None:
        """The step admitted by ``passage`` ended: ``failed`` True (it counts against the
        breaker), False (it succeeded) or None (no verdict: nothing ran, or an outcome that says
        nothing about the downstream). Writes only on a failure or outside the closed state."""
        name, token = passage.name, passage.trial
        copy = self._copy(name)
        if failed:
            policy = self.policy(name)
            if copy.circuit.state is BreakerState.OPEN and not copy.circuit.is_half_open(
                copy.now(self._clock())
            ):
                return  # admitted before it opened: changes nothing
            self._change(
                name,
                lambda c, now: record_failure(policy, c, now, token),
                error=error or "failed",
                create=True,
                why=f"step failed ({error or 'failed'})",
            )
        elif failed is False:
            if token is None and copy.circuit.state is BreakerState.CLOSED:
                return  # the hot path: a success while closed writes nothing
            policy = self.policy(name)
            self._change(
                name,
                lambda c, now: record_success(policy, c, now, token),
                why="trial steps succeeded",
            )
        elif token is not None:
            self._change(name, lambda c, now: release(c, token), why="")

    # -- copies of the rows --------------------------------------------------------------------

    def _copy(self, name: str) -> _Copy:
        with self._lock:
            copy = self._copies.get(name)
        if copy is None:
            self.register(name)
            return self._fresh(name)
        return copy

    def _fresh(self, name: str) -> _Copy:
        """The copy of ``name``, read again (with every known breaker) when it is stale."""
        with self._lock:
            copy = self._copies.get(name)
        if copy is not None and self._clock() - copy.read_at < self.cache_ttl_s:
            return copy
        if copy is None:
            self.register(name)
        if self._refreshing.acquire(blocking=copy is None or copy is _UNREAD):
            try:
                self._refresh()
            finally:
                self._refreshing.release()
        with self._lock:
            return self._copies[name]

    def _refresh(self) -> None:
        with self._lock:
            names = sorted(self._copies)
        try:
            with self.connect() as conn, conn.cursor(row_factory=dict_row) as cursor:
                self.statements += 1
                rows = cursor.execute(self._sql["read_breakers"], {"names": names}).fetchall()
        except Exception as exc:
            logger.debug("Could not read the circuit breakers (%s); using the last copy", exc)
            read_at = self._clock()
            with self._lock:  # trust the last copy for another TTL rather than ask every step
                for name, copy in self._copies.items():
                    db_now = time.time() if copy is _UNREAD else copy.now(read_at)
                    self._copies[name] = _Copy(copy.circuit, db_now, read_at)
            return
        read_at = self._clock()
        for row in rows:
            self._remember(row["name"], circuit_from_row(row), float(row["now"]), read_at, "")

    def _remember(
        self, name: str, circuit: Circuit, db_now: float, read_at: float, why: str
    ) -> None:
        with self._lock:
            self._copies[name] = _Copy(circuit, db_now, read_at)
        registry.note_state(name, circuit.state, why or "seen in the database")

    def _change(
        self,
        name: str,
        change: Callable[[Circuit, float], Circuit],
        *,
        why: str,
        error: str | None = None,
        create: bool = False,
    ) -> bool:
        """Apply ``change`` to the row of ``name`` under its lock, in one transaction; False
        when the database could not be reached (nothing changed)."""
        try:
            after, now = self._transact(name, change, error, create)
        except Exception as exc:
            logger.warning("Could not update circuit breaker %r (%s)", name, exc)
            return False
        self._remember(name, after, now, self._clock(), why)
        return True

    def _transact(
        self,
        name: str,
        change: Callable[[Circuit, float], Circuit],
        error: str | None,
        create: bool,
    ) -> tuple[Circuit, float]:
        """Lock the row, compute the change, write it if it changed anything: one transaction.
        Returns the new circuit and the database's clock."""
        sql = self._sql
        with (
            self.connect() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cursor,
        ):
            if create:
                self.statements += 1
                cursor.execute(sql["ensure_breaker"], {"name": name})
            self.statements += 1
            row = cursor.execute(sql["lock_breaker"], {"name": name}).fetchone()
            if row is None:  # no row: closed, and nothing but a failure creates one
                return change(Circuit(), time.time()), time.time()
            now = float(row["now"])
            before = circuit_from_row(row)
            after = change(before, now)
            if after != before:
                self.statements += 1
                cursor.execute(sql["write_breaker"], _row_params(name, after, error))
            return after, now

    def _defer(self, name: str, admission: Admission) -> Passage:
        """Defer until the open window ends, or (half-open, every trial slot taken) shortly."""
        wait = admission.wait_s
        if admission.circuit.state is not BreakerState.OPEN:
            wait = min(wait, _HALF_OPEN_RECHECK_S)
        return Passage(name, run=False, wait_s=self._jittered(min(wait, self.max_defer_s)))

    def _jittered(self, wait_s: float) -> float:
        return max(wait_s, _MIN_DEFER_S) * (1 + self._rng.random() * _JITTER)


def _row_params(name: str, circuit: Circuit, error: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "state": str(circuit.state),
        "failures": list(circuit.failures),
        "open_until": circuit.open_until if circuit.state is not BreakerState.CLOSED else None,
        "successes": circuit.successes,
        "trials": json.dumps(dict(circuit.trials)),
        "times_opened": circuit.times_opened,
        "error": error[:500] if error else None,
    }


# -- for operators (``tasker breakers``) --------------------------------------------------------


@dataclass(frozen=True)
class BreakerRow:
    """A shared breaker as ``tasker breakers`` shows it (``state`` is ``half_open`` once an open
    window has passed, even before a worker wrote it)."""

    name: str
    state: str
    failures: int
    open_for_s: float | None
    half_open_successes: int
    times_opened: int
    opened_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None
    changed_at: datetime


def list_breakers(conn: Any, name: str | None = None) -> list[BreakerRow]:
    """Every shared breaker that has a row (no row: closed, never failed), or only ``name``."""
    with conn.cursor(row_factory=class_row(BreakerRow)) as cursor:
        rows: list[BreakerRow] = cursor.execute(
            load_queries("breakers")["list_breakers"], {"name": name}
        ).fetchall()
    return rows


def reset_breaker(conn: Any, name: str) -> bool:
    """Close breaker ``name`` by hand (its failures forgotten); False when it has no row.
    Workers see it within their ``cache_ttl_s``; steps already deferred come back when their
    deferral ends (at most ``max_defer_s``)."""
    row = conn.execute(load_queries("breakers")["reset_breaker"], {"name": name}).fetchone()
    return row is not None

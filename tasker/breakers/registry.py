"""The breakers of this process, and who wants to hear when one changes state.

Every breaker (the database breaker of each broker, each step breaker a worker uses) reports its
state here. :func:`add_listener` subscribes a callback ``(name, state)``, called on every state
change this process sees, with ``state`` one of ``closed``, ``open``, ``half_open``
(:class:`~tasker.breakers.policy.BreakerState`); :func:`states` is the last state seen of every
breaker known here. Readiness probes and metrics subscribe to these.

A shared step breaker changes state in PostgreSQL; each process sees the change when it reads the
breaker again (within the breakers' ``cache_ttl_s``) or causes it, and each reports what it sees.
Every change is logged, one line each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tasker.breakers.policy import BreakerState

__all__ = ["Listener", "add_listener", "note_state", "register", "remove_listener", "states"]

logger = logging.getLogger("tasker.breakers")

Listener = Callable[[str, str], object]

_lock = threading.Lock()
_listeners: list[Listener] = []
_states: dict[str, BreakerState] = {}


def add_listener(callback: Listener) -> None:
    """Call ``callback(name, state)`` on every state change of a breaker of this process.

    It runs in the thread that saw the change, so it must be quick and must not block; what it
    raises is logged and ignored. Read :func:`states` for the states before it subscribed.
    """
    with _lock:
        _listeners.append(callback)


def remove_listener(callback: Listener) -> None:
    """Stop calling ``callback`` (nothing happens if it was not subscribed)."""
    with _lock:
        if callback in _listeners:
            _listeners.remove(callback)


def states() -> dict[str, str]:
    """The last state seen of every breaker this process knows, by name."""
    with _lock:
        return {name: str(state) for name, state in _states.items()}


def register(name: str) -> None:
    """Make breaker ``name`` known (closed, unless it already is known): not a change."""
    with _lock:
        _states.setdefault(name, BreakerState.CLOSED)


def note_state(name: str, state: BreakerState, why: str = "") -> None:
    """Record the state of breaker ``name`` as seen now; a change is logged and announced."""
    with _lock:
        before = _states.get(name, BreakerState.CLOSED)
        _states[name] = state
        listeners = list(_listeners)
    if before == state:
        return
    _log(name, before, state, why)
    for listener in listeners:
        try:
            listener(name, str(state))
        except Exception:
            logger.warning("A circuit breaker listener failed", exc_info=True)


def _log(name: str, before: BreakerState, state: BreakerState, why: str) -> None:
    """Opening and closing are warnings; the half-open round trips in between are info."""
    opened = before is BreakerState.CLOSED and state is BreakerState.OPEN
    closed = state is BreakerState.CLOSED
    level = logging.WARNING if opened or closed else logging.INFO
    suffix = f": {why}" if why else ""
    logger.log(level, "Circuit breaker %r %s -> %s%s", name, before, state, suffix)

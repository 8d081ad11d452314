"""Plumbing shared by the Postgres-backed Dramatiq backends: a lazily opened pool and waits.

Both backends take either a database ``url`` (they then own a pool, opened on first use and
closed by ``close()``) or a caller's ``pool`` (never opened or closed here). Driver errors leave
this module as Tasker's own exceptions, each naming the fix.

A blocking wait (:func:`wait_until`) is woken by NOTIFY: migration 0006 makes every stored
result and every rate-limiter event notify the channel of its key (:func:`channel_name`). The
waits of a backend share one LISTEN connection (:class:`~tasker.backends._listener.Listener`),
opened with the pool's connection settings but never part of the pool, so no pooled connection
ever carries LISTEN state. Notifications only make a wait return sooner: the wait re-reads its
row once the LISTEN runs, after each notification, and every second in case one is lost, and
polls as before when it cannot listen.

After a fork, a backend's owned pool and its listener are the parent's sessions: the child
makes its own on first use and neither uses nor closes the parent's (a caller's pool is the
caller's to handle).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from tasker.backends._listener import Listener, Subscription, SubscriptionState
from tasker.db.connection import make_pool
from tasker.db.queries import load_queries, render
from tasker.exceptions import ConfigurationError, DatabaseError, MigrationError

__all__ = [
    "EVENT_CHANNEL_PREFIX",
    "LISTEN_FALLBACK_POLL_S",
    "POLL_INITIAL_S",
    "POLL_MAX_S",
    "RESULT_CHANNEL_PREFIX",
    "LazyPool",
    "channel_name",
    "poll_until",
    "wait_until",
]

#: First pause, in seconds, between two polls of a wait that cannot listen; doubled after
#: every miss.
POLL_INITIAL_S = 0.01
#: Longest pause, in seconds, between two polls of a wait that cannot listen.
POLL_MAX_S = 0.25
#: Seconds between two checks of a listening wait that no notification woke (one lost by a
#: PgBouncer in transaction mode, or sent by a database without migration 0006).
LISTEN_FALLBACK_POLL_S = 1.0
#: Channel prefix of ``tasker.dramatiq_results`` rows (trigger of migration 0006).
RESULT_CHANNEL_PREFIX = "tasker_result_"
#: Channel prefix of ``tasker.dramatiq_rate_limit_events`` rows (trigger of migration 0006).
EVENT_CHANNEL_PREFIX = "tasker_event_"


def channel_name(prefix: str, key: str) -> str:
    """The NOTIFY channel of ``key``: ``prefix`` and the MD5 hex digest of its UTF-8 bytes.

    The same name as migration 0006's triggers compute (``md5(convert_to(key, 'UTF8'))``),
    whatever the database encoding, and at most 46 bytes for Tasker's prefixes, well within
    PostgreSQL's 63-byte identifiers however long the key is.
    """
    return prefix + hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


def _new_fork_lock() -> threading.Lock:
    return threading.Lock()


#: Serialises the replacement of a LazyPool's state in a forked child. Made anew in every
#: child, so a thread that held it at the fork cannot leave it locked there.
_fork_lock = _new_fork_lock()


def _after_fork_in_child() -> None:
    global _fork_lock  # noqa: PLW0603 - a module-wide lock, re-made after a fork
    _fork_lock = _new_fork_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ProcessState:
    """What a :class:`LazyPool` holds in one process: a lock, the pool, the listener."""

    def __init__(self, pool: ConnectionPool[Any] | None) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.pool = pool
        self.listener: Listener | None = None


class LazyPool:
    """A connection pool that is opened on first use, or a caller's pool used as is, and the
    LISTEN connection the backend's blocked waits share."""

    def __init__(
        self,
        *,
        url: str | None,
        pool: ConnectionPool[Any] | None,
        name: str,
        max_size: int = 8,
    ) -> None:
        if (url is None) == (pool is None):
            raise ConfigurationError(
                f"{name}: pass exactly one of url= (a PostgreSQL URL) or pool= (an open "
                "psycopg_pool.ConnectionPool)."
            )
        self._url = url
        self._callers_pool = pool
        self._owned = pool is None
        self._name = name
        self._max_size = max_size
        self._state = _ProcessState(pool)

    def _process(self) -> _ProcessState:
        """This process's state: after a fork, a new one (the parent's is left untouched)."""
        state = self._state
        if state.pid != os.getpid():
            with _fork_lock:
                if self._state.pid != os.getpid():
                    self._state = _ProcessState(self._callers_pool)
                state = self._state
        return state

    def _get_pool(self) -> ConnectionPool[Any]:
        state = self._process()
        with state.lock:
            if state.pool is None:
                assert self._url is not None
                pool = make_pool(self._url, max_size=self._max_size, name=self._name)
                pool.open()
                state.pool = pool
            return state.pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """Borrow a connection; driver errors are raised as :class:`DatabaseError`."""
        try:
            with self._get_pool().connection() as conn:
                yield conn
        except pg_errors.UndefinedTable as exc:
            raise MigrationError(
                f"{self._name}: a Tasker table is missing ({exc}). Apply Tasker's migrations "
                "(`tasker db migrate`) to this database."
            ) from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseError(
                f"{self._name}: PostgreSQL is unreachable ({exc}). Check the database URL and "
                "that the server accepts connections."
            ) from exc

    def listener(self) -> Listener:
        """This process's listener (its thread and connection start on the first wait)."""
        state = self._process()
        with state.lock:
            if state.listener is None:
                state.listener = Listener(self._connect_listener, name=self._name)
            return state.listener

    def _connect_listener(self) -> psycopg.Connection[Any]:
        """A new autocommit connection, outside the pool, with the pool's connection string
        and keyword arguments (a caller's pool's too). Raises ``psycopg.Error`` or ``OSError``
        when it cannot be opened."""
        pool = self._get_pool()
        conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
        kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
        return psycopg.Connection.connect(conninfo or "", **{**(kwargs or {}), "autocommit": True})

    def close(self) -> None:
        """Stop the listener, and close the pool if this object opened it (a later use
        reopens both).

        A caller's pool is left alone.
        """
        state = self._process()
        with state.lock:
            listener = state.listener
        # The listener first: its thread may be opening its connection with the pool's
        # settings, which would reopen a pool closed before.
        if listener is not None:
            listener.close()
        if not self._owned:
            return
        with state.lock:
            pool, state.pool = state.pool, None
        if pool is not None:
            pool.close()


def _deadline(timeout_ms: float | None) -> float | None:
    """The ``time.monotonic()`` instant ``timeout_ms`` from now (``None``: never)."""
    return None if timeout_ms is None else time.monotonic() + max(timeout_ms, 0) / 1000


def _pause(deadline: float | None, longest_s: float) -> float | None:
    """Seconds to pause before the next check: ``longest_s`` cut to the deadline; ``None`` once
    the deadline has passed."""
    if deadline is None:
        return longest_s
    remaining = deadline - time.monotonic()
    return None if remaining <= 0 else min(longest_s, remaining)


def _remaining_ms(deadline: float | None) -> float | None:
    """Milliseconds left until ``deadline`` (``None``: no deadline; 0 once passed)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0) * 1000


def poll_until(probe: Callable[[], bool], timeout_ms: float | None) -> bool:
    """Call ``probe`` with a doubling pause (10 ms up to 250 ms) until it returns true or
    ``timeout_ms`` milliseconds elapse; ``None`` waits forever.

    The probe always runs once more at the deadline, so a timeout is only reported after the
    full wait. Returns whether the probe returned true; the probe's errors propagate.
    """
    deadline = _deadline(timeout_ms)
    delay = POLL_INITIAL_S
    while True:
        if probe():
            return True
        pause = _pause(deadline, delay)
        if pause is None:
            return False
        time.sleep(pause)
        delay = min(delay * 2, POLL_MAX_S)


def wait_until(
    probe: Callable[[], bool], timeout_ms: float | None, listener: Listener, channel: str
) -> bool:
    """Wait until ``probe`` returns true, for up to ``timeout_ms`` milliseconds (``None``:
    forever), woken by the notifications ``listener`` receives on ``channel``.

    ``probe`` runs first; only when it is false does the wait register on ``channel``, and the
    probe runs again once the listener LISTENs on it, so a notification sent before LISTEN is
    never missed. Then the probe runs after every notification, after every
    :data:`LISTEN_FALLBACK_POLL_S` seconds without one, and at the deadline, so a timeout is
    only reported after the full wait. When the listener cannot listen, or fails during the
    wait, the rest of the wait is :func:`poll_until` (the listener logs why, once).

    Returns whether the probe returned true; the probe's errors propagate.
    """
    deadline = _deadline(timeout_ms)
    if probe():
        return True
    if _pause(deadline, LISTEN_FALLBACK_POLL_S) is None:
        return False
    subscription = listener.subscribe(channel)
    if subscription is None:
        return poll_until(probe, _remaining_ms(deadline))
    try:
        found = _wait_for_notifications(subscription, probe, deadline)
    finally:
        listener.unsubscribe(subscription)
    if found is None:
        return poll_until(probe, _remaining_ms(deadline))
    return found


def _wait_for_notifications(
    subscription: Subscription, probe: Callable[[], bool], deadline: float | None
) -> bool | None:
    """Run ``probe`` whenever ``subscription``'s event is set (its LISTEN ran, or a
    notification came) or a fallback pause passes, until it returns true (``True``) or
    ``deadline`` passes (``False``). ``None``: the subscription was lost (poll instead).

    The event is cleared before each probe, so a notification during a probe wakes the next
    one. The probe's errors propagate.
    """
    while True:
        pause = _pause(deadline, LISTEN_FALLBACK_POLL_S)
        if pause is None:
            return False
        subscription.event.wait(pause)
        subscription.event.clear()
        if subscription.state is SubscriptionState.LOST:
            return None
        if probe():
            return True


def query(name: str) -> str:
    """The backends' statement ``name`` (``sql/queries/backends.sql``)."""
    return load_queries("backends")[name]


@cache
def delete_expired(table: str) -> str:
    """The statement that deletes a batch of expired rows of ``tasker.<table>``."""
    return render("backends", "delete_expired", table=sql.Identifier("tasker", table))

"""Plumbing shared by the Postgres-backed Dramatiq backends: a lazily opened pool and waits.

Both backends take either a database ``url`` (they then own a pool, opened on first use and
closed by ``close()``) or a caller's ``pool`` (never opened or closed here). Driver errors leave
this module as Tasker's own exceptions, each naming the fix.

A blocking wait (:func:`wait_until`) is woken by NOTIFY: migration 0006 makes every stored
result and every rate-limiter event notify the channel of its key (:func:`channel_name`). The
wait LISTENs on a connection of its own, opened with the pool's connection settings but never
part of the pool, so no pooled connection ever carries LISTEN state. Notifications only make a
wait return sooner: the wait re-reads its row after each one, polls slowly in case one is lost,
and polls as before when it cannot listen.
"""

from __future__ import annotations

import hashlib
import logging
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

logger = logging.getLogger(__name__)

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


class LazyPool:
    """A connection pool that is opened on first use, or a caller's pool used as is."""

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
        self._pool = pool
        self._owned = pool is None
        self._name = name
        self._max_size = max_size
        self._lock = threading.Lock()

    def _get_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None:
                assert self._url is not None
                pool = make_pool(self._url, max_size=self._max_size, name=self._name)
                pool.open()
                self._pool = pool
            return self._pool

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

    def listen(self, channel: str) -> psycopg.Connection[Any]:
        """A new autocommit connection, outside the pool, that LISTENs on ``channel``.

        It is opened with the pool's connection string and keyword arguments (a caller's pool's
        too); the caller closes it. Raises ``psycopg.Error`` or ``OSError`` when it cannot be
        opened or the LISTEN fails.
        """
        pool = self._get_pool()
        conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
        kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
        conn = psycopg.Connection.connect(conninfo or "", **{**(kwargs or {}), "autocommit": True})
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the pool if this object opened it (a later use reopens it).

        A caller's pool is left alone.
        """
        if not self._owned:
            return
        with self._lock:
            pool, self._pool = self._pool, None
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
    probe: Callable[[], bool],
    timeout_ms: float | None,
    listen: Callable[[], psycopg.Connection[Any]],
) -> bool:
    """Wait until ``probe`` returns true, for up to ``timeout_ms`` milliseconds (``None``:
    forever), woken by the notifications of the connection ``listen`` opens.

    ``probe`` runs first; only when it is false is the listening connection opened, and the
    probe runs again right after, so a notification sent before LISTEN is never missed. Then the
    probe runs after every notification, after every :data:`LISTEN_FALLBACK_POLL_S` seconds
    without one, and at the deadline, so a timeout is only reported after the full wait. When
    ``listen`` raises (``psycopg.Error``, ``OSError``), or the listening connection is lost, the
    rest of the wait is :func:`poll_until`. The listening connection is closed on return.

    Returns whether the probe returned true; the probe's errors propagate.
    """
    deadline = _deadline(timeout_ms)
    if probe():
        return True
    if _pause(deadline, LISTEN_FALLBACK_POLL_S) is None:
        return False
    try:
        conn = listen()
    except (psycopg.Error, OSError) as exc:
        logger.warning("cannot LISTEN (%s); polling instead", exc)
        return poll_until(probe, _remaining_ms(deadline))
    try:
        return _wait_for_notifications(conn, probe, deadline)
    except _ListenerLostError as lost:
        logger.warning("LISTEN connection lost (%s); polling instead", lost.__cause__)
    finally:
        conn.close()
    return poll_until(probe, _remaining_ms(deadline))


class _ListenerLostError(Exception):
    """The listening connection failed; its error is the ``__cause__``."""


def _wait_for_notifications(
    conn: psycopg.Connection[Any], probe: Callable[[], bool], deadline: float | None
) -> bool:
    """Run ``probe`` now and after each notification on ``conn`` (or a fallback pause) until
    it returns true (``True``) or ``deadline`` passes (``False``).

    Raises :class:`_ListenerLostError` when ``conn`` fails; the probe's errors propagate.
    """
    while True:
        if probe():
            return True
        pause = _pause(deadline, LISTEN_FALLBACK_POLL_S)
        if pause is None:
            return False
        try:
            for _ in conn.notifies(timeout=pause, stop_after=1):
                pass
        except psycopg.Error as exc:
            raise _ListenerLostError() from exc


def query(name: str) -> str:
    """The backends' statement ``name`` (``sql/queries/backends.sql``)."""
    return load_queries("backends")[name]


@cache
def delete_expired(table: str) -> str:
    """The statement that deletes a batch of expired rows of ``tasker.<table>``."""
    return render("backends", "delete_expired", table=sql.Identifier("tasker", table))

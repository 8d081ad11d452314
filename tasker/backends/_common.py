"""Plumbing shared by the Postgres-backed Dramatiq backends: a lazily opened pool and polling.

Both backends take either a database ``url`` (they then own a pool, opened on first use and
closed by ``close()``) or a caller's ``pool`` (never opened or closed here). Driver errors leave
this module as Tasker's own exceptions, each naming the fix.
"""

from __future__ import annotations

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

__all__ = ["POLL_INITIAL_S", "POLL_MAX_S", "LazyPool", "poll_until"]

#: First pause, in seconds, between two polls of a blocking wait; doubled after every miss.
POLL_INITIAL_S = 0.01
#: Longest pause, in seconds, between two polls of a blocking wait.
POLL_MAX_S = 0.25


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


def poll_until(probe: Callable[[], bool], timeout_ms: float | None) -> bool:
    """Call ``probe`` with a doubling pause until it returns true or ``timeout_ms`` elapses.

    ``None`` waits forever. The probe always runs once more at the deadline, so a timeout is
    only reported after the full wait.
    """
    deadline = None if timeout_ms is None else time.monotonic() + max(timeout_ms, 0) / 1000
    delay = POLL_INITIAL_S
    while True:
        if probe():
            return True
        if deadline is None:
            pause = delay
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pause = min(delay, remaining)
        time.sleep(pause)
        delay = min(delay * 2, POLL_MAX_S)


def query(name: str) -> str:
    """The backends' statement ``name`` (``sql/queries/backends.sql``)."""
    return load_queries("backends")[name]


@cache
def delete_expired(table: str) -> str:
    """The statement that deletes a batch of expired rows of ``tasker.<table>``."""
    return render("backends", "delete_expired", table=sql.Identifier("tasker", table))

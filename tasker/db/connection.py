"""Connections and pools: one place decides how Tasker talks to PostgreSQL.

Every connection is autocommit (explicit ``with conn.transaction()`` blocks where atomicity is
needed), carries an ``application_name``, a statement timeout and an idle-in-transaction timeout,
so a stuck client can never pin the vacuum horizon of the queue tables.

Pools (:class:`TaskerPool`) check a connection before lending it (:func:`check_connection`): a
connection whose server session ended while it sat idle (a restart, ``pg_terminate_backend``) is
replaced instead of failing the caller's first statement. One timeout (``timeout_s``) bounds both
opening a connection and waiting for a pooled one.

json and jsonb values are decoded by :func:`load_json`: jsonb stores numbers as ``numeric``, so a
float such as ``1e300`` comes back as a 301-digit whole number; Tasker stores no ints beyond 64
bits (the payload rule refuses them), so such a number is read back as the float it was.
"""

from __future__ import annotations

import json
import select
from typing import Any, Self

import psycopg
import psycopg.types.json
from psycopg_pool import ConnectionPool

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "DEFAULT_TIMEOUT_S",
    "TaskerConnection",
    "TaskerPool",
    "check_connection",
    "connect",
    "connection_kwargs",
    "last_connect_error",
    "load_json",
    "make_pool",
]

DEFAULT_APPLICATION_NAME = "tasker"
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
#: Seconds to open a connection, and to wait for a pooled one (``database.timeout_s``).
DEFAULT_TIMEOUT_S = 5.0
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
_INT64_MAX = 2**63 - 1


def _number(text: str) -> int | float:
    value = int(text)
    return value if -_INT64_MAX - 1 <= value <= _INT64_MAX else float(text)


def load_json(data: str | bytes) -> Any:
    """Decode a json or jsonb value read from PostgreSQL, a whole number beyond 64 bits as a float.

    jsonb writes a stored ``1e19`` as ``10000000000000000000``; this reads it back as ``1e19``,
    the float the payload rule (:mod:`tasker.workflow.payloads`) let through. Every connection
    made by :func:`connect` and :func:`make_pool` uses it.
    """
    return json.loads(data, parse_int=_number)


class TaskerConnection(psycopg.Connection[Any]):
    """A psycopg connection whose json and jsonb values are decoded by :func:`load_json`."""

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> Self:
        """Open the connection (same arguments as :meth:`psycopg.Connection.connect`)."""
        conn = super().connect(*args, **kwargs)
        psycopg.types.json.set_json_loads(load_json, conn)
        return conn


def connection_kwargs(
    *,
    application_name: str = DEFAULT_APPLICATION_NAME,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    synchronous_commit: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Keyword arguments for :func:`psycopg.connect` shared by every Tasker connection.

    ``synchronous_commit=False`` is only for statements whose loss in a server crash causes a
    redelivery, never a lost message (claims, acks, lease extensions).

    Sessions plan with ``enable_seqscan=off`` (decision 0015): every statement Tasker runs is
    keyed by an id or a queue's visibility time with an index to match, but a session keeps the
    plans of its prepared statements and functions for its life, made from the statistics of
    the moment; tables analyzed while small would be scanned whole on every call once they grow.
    The setting only steers the choice between plans: a statement with no usable index scans.
    """
    options = (
        f"-c statement_timeout={int(statement_timeout_ms)} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS} "
        "-c TimeZone=UTC -c enable_seqscan=off"
    )
    if not synchronous_commit:
        options += " -c synchronous_commit=off"
    return {
        "autocommit": True,
        "application_name": application_name,
        "options": options,
        "keepalives": 1,
        "keepalives_idle": 30,
        "connect_timeout": max(round(timeout_s), 1),
    }


def connect(url: str, **overrides: Any) -> psycopg.Connection[Any]:
    """Open one autocommit connection to ``url`` with Tasker's session settings."""
    kwargs = connection_kwargs()
    kwargs.update(overrides)
    return TaskerConnection.connect(url, **kwargs)


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """A pool's check before lending ``conn``: raises if its session is gone.

    A healthy idle connection has nothing to read, so it is lent without a round trip. When the
    server said something while the connection sat idle (the FATAL message of a terminated
    session, or the end of the stream after a restart), a real check decides.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError) as exc:
        raise psycopg.OperationalError(f"the connection's socket is unusable: {exc}") from exc
    if readable:
        ConnectionPool.check_connection(conn)


class _ConnectFailures:
    """The last error of a pool's connection attempts (None after a success)."""

    def __init__(self) -> None:
        self.last: psycopg.Error | None = None


def _recording_connection_class(failures: _ConnectFailures) -> type[psycopg.Connection[Any]]:
    """A connection class that notes why the pool's last connection attempt failed, so an error
    after a pool timeout can say "database x does not exist" instead of only "timed out"."""

    class RecordingConnection(TaskerConnection):
        connect_failures = failures

        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                conn = super().connect(*args, **kwargs)
            except psycopg.Error as exc:
                failures.last = exc
                raise
            failures.last = None
            return conn

    return RecordingConnection


def last_connect_error(pool: ConnectionPool[Any]) -> psycopg.Error | None:
    """Why the last attempt of a pool made by :func:`make_pool` to connect failed, if it did."""
    failures = getattr(pool.connection_class, "connect_failures", None)
    return failures.last if isinstance(failures, _ConnectFailures) else None


class TaskerPool(ConnectionPool[psycopg.Connection[Any]]):
    """A psycopg pool that lends only live connections, without waiting when it finds dead ones.

    psycopg_pool's own ``check`` callback sleeps with a growing backoff after every dead
    connection it meets (0, 1, 2, 4 s...), so after a restart killed a pool's ten sessions, a
    caller would wait for minutes. Here a dead connection is closed and handed back (the pool
    replaces it in the background), the other idle ones are tested at once, since they most
    likely died together, and the next one is lent.
    """

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        """A live connection from the pool (see the class docstring); ``PoolTimeout`` after
        ``timeout`` (default: the pool's) when none comes."""
        for _ in range((self.max_size or 1) + 1):
            conn = super().getconn(timeout)
            try:
                check_connection(conn)
            except psycopg.Error:
                conn.close()
                self.putconn(conn)  # discarded and replaced
                self.check()  # its idle siblings, in this thread, once
                continue
            return conn
        return super().getconn(timeout)


def make_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 16,
    application_name: str = DEFAULT_APPLICATION_NAME,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    synchronous_commit: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    name: str = "tasker",
) -> TaskerPool:
    """Create (but do not open) a thread-safe pool of autocommit connections to ``url``.

    ``timeout_s`` bounds both opening a connection and waiting for a free one
    (``psycopg_pool.PoolTimeout`` after that).
    """
    return TaskerPool(
        url,
        connection_class=_recording_connection_class(_ConnectFailures()),
        min_size=min_size,
        max_size=max_size,
        kwargs=connection_kwargs(
            application_name=application_name,
            statement_timeout_ms=statement_timeout_ms,
            synchronous_commit=synchronous_commit,
            timeout_s=timeout_s,
        ),
        open=False,
        name=name,
        timeout=timeout_s,
        max_idle=300.0,
        reconnect_timeout=max(timeout_s, 1.0),
    )

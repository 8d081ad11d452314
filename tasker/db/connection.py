"""Connections and pools: one place decides how Tasker talks to PostgreSQL.

Every connection is autocommit (explicit ``with conn.transaction()`` blocks where atomicity is
needed), carries an ``application_name``, a statement timeout and an idle-in-transaction timeout,
so a stuck client can never pin the vacuum horizon of the queue tables.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "connect",
    "connection_kwargs",
    "make_pool",
]

DEFAULT_APPLICATION_NAME = "tasker"
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000


def connection_kwargs(
    *,
    application_name: str = DEFAULT_APPLICATION_NAME,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    synchronous_commit: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for :func:`psycopg.connect` shared by every Tasker connection.

    ``synchronous_commit=False`` is only for statements whose loss in a server crash causes a
    redelivery, never a lost message (claims, acks, lease extensions).
    """
    options = (
        f"-c statement_timeout={int(statement_timeout_ms)} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS} "
        "-c TimeZone=UTC"
    )
    if not synchronous_commit:
        options += " -c synchronous_commit=off"
    return {
        "autocommit": True,
        "application_name": application_name,
        "options": options,
        "keepalives": 1,
        "keepalives_idle": 30,
        "connect_timeout": 10,
    }


def connect(url: str, **overrides: Any) -> psycopg.Connection[Any]:
    """Open one autocommit connection to ``url`` with Tasker's session settings."""
    kwargs = connection_kwargs()
    kwargs.update(overrides)
    return psycopg.connect(url, **kwargs)


def make_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 16,
    application_name: str = DEFAULT_APPLICATION_NAME,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    synchronous_commit: bool = True,
    name: str = "tasker",
) -> ConnectionPool[psycopg.Connection[Any]]:
    """Create (but do not open) a thread-safe pool of autocommit connections to ``url``."""
    return ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connection_kwargs(
            application_name=application_name,
            statement_timeout_ms=statement_timeout_ms,
            synchronous_commit=synchronous_commit,
        ),
        open=False,
        name=name,
        timeout=30.0,
        max_idle=300.0,
        reconnect_timeout=300.0,
    )

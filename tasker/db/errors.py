"""Tell database errors that pass (retry later) from errors caused by the data (never retry).

The rule every component follows (docs/workflows.md, "What happens to a step when something
fails"):

* **transient**: the connection or the server is in trouble, or the transaction lost a race. The
  same statement can succeed a moment later: connection failures (SQLSTATE class 08), an
  administrator or crash shutdown, a server that cannot accept connections yet (57P01-57P03), a
  serialization failure or deadlock (class 40), a lock or statement timeout (55P03, 57014), a
  server out of resources (class 53) or with an I/O error (class 58); also every client-side
  error without a SQLSTATE (a closed connection, a pool that timed out).
* **permanent**: everything else, above all what the data itself causes (class 22: a NUL
  character, a bad Unicode escape; class 23: a violated constraint; class 54: a value too large).
  Retrying it would fail the same way for ever.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from tasker.exceptions import (
    DatabaseError,
    DatabaseUnavailableError,
    MigrationError,
    PayloadError,
)

__all__ = ["database_error", "describe_url", "is_data_error", "is_transient"]

_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "58"})
_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "55P03", "57014"})


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is a database error that may pass if the operation is repeated."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # raised on the client: lost connection, pool timeout, closed connection
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL refused a value itself (SQLSTATE class 22 "data exception", or 54
    "program limit exceeded", such as a jsonb value too large), or Tasker's payload rule did."""
    if isinstance(exc, PayloadError):
        return True
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and state is not None and state[:2] in ("22", "54")


def describe_url(url: str | None) -> str:
    """``host:port/dbname`` of a libpq URL or key=value string, without any credential."""
    if not url:
        return "the configured database"
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured database (its URL cannot be parsed)"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def database_error(
    exc: BaseException, *, url: str | None, timeout_s: float | None = None
) -> DatabaseError:
    """Tasker's own error for a driver error ``exc``, with the fix in its message.

    * the server cannot be reached (or a pooled connection did not come in time):
      :class:`DatabaseUnavailableError` naming the URL setting;
    * a Tasker table or function is missing: :class:`MigrationError` ("run tasker db migrate");
    * anything else: :class:`DatabaseError`.
    """
    where = describe_url(url)
    state = getattr(exc, "sqlstate", None) or ""
    if state[:2] == "28" or state == "3D000":  # authentication, or no such database
        return DatabaseUnavailableError(
            f"PostgreSQL at {where} refused the connection: {_first_line(exc)}; fix database.url "
            "(TASKER_DATABASE__URL)."
        )
    if is_transient(exc):
        within = f" within {timeout_s:g}s" if timeout_s else ""
        return DatabaseUnavailableError(
            f"Cannot reach PostgreSQL at {where}{within} ({_first_line(exc)}); check that it is "
            "running and that database.url (TASKER_DATABASE__URL) points to it."
        )
    if isinstance(exc, (pg_errors.UndefinedTable, pg_errors.UndefinedFunction)):
        return MigrationError(
            f"The database at {where} lacks Tasker's schema ({_first_line(exc)}); run "
            "`tasker db migrate`."
        )
    return DatabaseError(f"PostgreSQL at {where} refused the operation: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

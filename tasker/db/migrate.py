"""Apply Tasker's numbered SQL migrations and install PGMQ, idempotently and under a lock.

Migrations are the files ``sql/migrations/NNNN_name.sql``: an immutable, ordered history. Each one
runs in its own transaction and is recorded in ``tasker.schema_migrations`` with a checksum; a
changed file that was already applied is an error, never silently re-run. PGMQ is installed first
(version 0): ``CREATE EXTENSION pgmq`` where the extension is available, otherwise the SQL script
bundled in the ``pgmq`` package, and never twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tasker.db.connection import connect
from tasker.exceptions import MigrationError
from tasker.resources import bundled_path

__all__ = [
    "Migration",
    "MigrationStatus",
    "available_migrations",
    "migrate",
    "migration_status",
    "pending_migrations",
    "schema_problem",
]

logger = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 7_305_118_273_001  # pg_advisory_lock key owned by Tasker's migrator
PGMQ_VERSION_ROW = 0
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    """What is applied in a database and what is still pending."""

    applied: tuple[int, ...]
    pending: tuple[Migration, ...]
    pgmq: str | None


def available_migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files in order; a badly named file is an error."""
    folder = directory or bundled_path("sql") / "migrations"
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if not match:
            raise MigrationError(
                f"Migration file {path.name} is not named NNNN_lower_snake.sql; rename it."
            )
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"Two migration files share a number in {folder}; renumber one.")
    return found


def migrate(url: str, *, migrations: Sequence[Migration] | None = None) -> list[Migration]:
    """Install PGMQ and apply pending migrations to the database at ``url``; return what ran."""
    todo = list(migrations) if migrations is not None else available_migrations()
    with connect(url, application_name="tasker-migrate", options="-c TimeZone=UTC") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            _ensure_bookkeeping(conn)
            _install_pgmq(conn)
            applied = _applied(conn)
            ran = [m for m in todo if _apply(conn, m, applied)]
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    for migration in ran:
        logger.info("Applied migration %04d_%s", migration.version, migration.name)
    return ran


def migration_status(url: str) -> MigrationStatus:
    """Report applied and pending migrations without changing anything."""
    with connect(url, application_name="tasker-migrate") as conn:
        applied = _applied_if_any(conn)
        pgmq = applied.pop(PGMQ_VERSION_ROW, None)
    pending = tuple(m for m in available_migrations() if m.version not in applied)
    return MigrationStatus(tuple(sorted(applied)), pending, pgmq)


def pending_migrations(conn: psycopg.Connection[Any]) -> list[Migration]:
    """The bundled migrations not yet applied in ``conn``'s database: all of them before the
    first ``tasker db migrate``. Reads only."""
    applied = _applied_if_any(conn)
    return [m for m in available_migrations() if m.version not in applied]


def schema_problem(conn: psycopg.Connection[Any]) -> str | None:
    """``the database lacks 2 migration(s) of this Tasker (0003_x, 0004_y); run `tasker db
    migrate``` when any is pending, else None. Workers check it at boot, the coordinator
    before it acts."""
    pending = pending_migrations(conn)
    if not pending:
        return None
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
    return (
        f"the database lacks {len(pending)} migration(s) of this Tasker ({names}); "
        "run `tasker db migrate`"
    )


def _applied_if_any(conn: psycopg.Connection[Any]) -> dict[int, str]:
    exists = conn.execute("SELECT to_regclass('tasker.schema_migrations')").fetchone()
    return _applied(conn) if exists and exists[0] else {}


def _ensure_bookkeeping(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("CREATE SCHEMA IF NOT EXISTS tasker")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS tasker.schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )


def _applied(conn: psycopg.Connection[Any]) -> dict[int, str]:
    rows = conn.execute("SELECT version, checksum FROM tasker.schema_migrations").fetchall()
    return {int(version): str(checksum) for version, checksum in rows}


def _apply(conn: psycopg.Connection[Any], migration: Migration, applied: dict[int, str]) -> bool:
    done = applied.get(migration.version)
    if done is not None:
        if done != migration.checksum:
            raise MigrationError(
                f"Migration {migration.path.name} changed after it was applied; migrations are "
                "immutable: restore the file and add a new numbered migration instead."
            )
        return False
    try:
        with conn.transaction():
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO tasker.schema_migrations (version, name, checksum)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as exc:
        raise MigrationError(
            f"Migration {migration.path.name} failed and was rolled back: {exc}"
        ) from exc
    return True


def _install_pgmq(conn: psycopg.Connection[Any]) -> None:
    """Install PGMQ once: the extension when the server has it, else the bundled SQL."""
    recorded = conn.execute(
        "SELECT 1 FROM tasker.schema_migrations WHERE version = %s", (PGMQ_VERSION_ROW,)
    ).fetchone()
    if recorded:
        return
    from pgmq.install import get_embedded_install_sql, get_embedded_sql_version

    version = get_embedded_sql_version()
    has_extension = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'"
    ).fetchone()
    already = conn.execute("SELECT to_regclass('pgmq.meta')").fetchone()
    with conn.transaction():
        if already and already[0]:
            how = "present"
        elif has_extension:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
            how = "extension"
        else:
            conn.execute(get_embedded_install_sql().encode())
            how = "sql"
        conn.execute(
            "INSERT INTO tasker.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (PGMQ_VERSION_ROW, f"pgmq {version} ({how})", f"pgmq-{version}"),
        )
    logger.info("PGMQ %s installed (%s)", version, how)

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tasker.db.migrate import available_migrations, migrate, migration_status
from tasker.db.schema import dump_schema
from tasker.exceptions import MigrationError

SNAPSHOT = Path(__file__).resolve().parent.parent / "sql" / "schema.sql"


def test_migrations_from_scratch_match_the_schema_snapshot(empty_database_url: str) -> None:
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert dump_schema(conn) == SNAPSHOT.read_text(), (
            "sql/schema.sql is stale: run `tasker db schema --write` and commit it"
        )


def test_migrate_is_idempotent_and_installs_pgmq_once(empty_database_url: str) -> None:
    first = migrate(empty_database_url)
    assert [m.version for m in first] == [m.version for m in available_migrations()]
    assert migrate(empty_database_url) == []
    status = migration_status(empty_database_url)
    assert status.pending == ()
    assert status.pgmq is not None and status.pgmq.startswith("pgmq-1.13")
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('pgmq.meta')").fetchone() == ("pgmq.meta",)


def test_changed_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    original = available_migrations()
    migrate(empty_database_url, migrations=original)
    copy = tmp_path / original[0].path.name
    copy.write_text(original[0].sql + "\n-- edited\n")
    edited = [type(original[0])(original[0].version, original[0].name, copy)]
    with pytest.raises(MigrationError, match="immutable"):
        migrate(empty_database_url, migrations=edited)


def test_failing_migration_rolls_back_and_names_the_file(
    empty_database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "0999_broken.sql"
    bad.write_text("CREATE TABLE tasker.half_done (id int);\nSELECT no_such_function();\n")
    good = available_migrations()
    with pytest.raises(MigrationError, match=r"0999_broken\.sql"):
        migrate(empty_database_url, migrations=[*good, *available_migrations(tmp_path)])
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('tasker.half_done')").fetchone() == (None,)
    assert migration_status(empty_database_url).applied == tuple(m.version for m in good)


def test_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(empty_database_url), range(4)))
    assert sum(len(r) for r in results) == len(available_migrations())

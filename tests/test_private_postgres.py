"""The ``private_postgres`` fixture: a server of the test's own, safe to stop and restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.private_postgres import PrivatePostgres, PrivatePostgresError, StopMode

pytestmark = pytest.mark.slow


def _scalar(url: str, query: str) -> Any:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    return None if row is None else row[0]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_runs_its_own_server_on_another_port(
    private_postgres: PrivatePostgres, server_url: str
) -> None:
    suite = conninfo_to_dict(server_url)
    suite_port = int(suite.get("port") or 5432)
    assert private_postgres.port != suite_port

    url = conninfo_to_dict(private_postgres.url())
    assert url["host"] == "127.0.0.1"
    assert int(str(url["port"])) == private_postgres.port
    assert "password" not in url
    with psycopg.connect(private_postgres.url()) as conn:
        row = conn.execute(
            "SELECT current_setting('data_directory'), inet_server_addr()::text,"
            " inet_server_port(), current_setting('listen_addresses'),"
            " current_setting('server_version_num')::int,"
            " current_setting('max_connections')::int,"
            " current_setting('synchronous_commit'),"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).fetchone()
    assert row is not None
    data_dir, address, port, listen, version, max_connections, sync_commit, is_super = row
    assert Path(data_dir) == private_postgres.data_dir
    assert address == "127.0.0.1/32"
    assert port == private_postgres.port
    assert listen == "127.0.0.1"
    assert max_connections >= 100
    assert sync_commit == "on"
    assert is_super is True
    suite_major = int(_scalar(server_url, "SHOW server_version_num")) // 10_000
    assert version // 10_000 == private_postgres.major_version == suite_major
    assert private_postgres.bin_dir.is_dir()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_committed_rows_survive_a_restart(
    private_postgres: PrivatePostgres, mode: StopMode
) -> None:
    url = private_postgres.url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('committed')")
    open_session = psycopg.connect(url)
    open_session.execute("INSERT INTO t VALUES ('uncommitted')")
    pid_before = private_postgres.pid
    port_before = private_postgres.port

    private_postgres.restart(mode)

    assert private_postgres.is_running()
    assert private_postgres.pid != pid_before
    assert private_postgres.port == port_before
    with pytest.raises(psycopg.OperationalError):
        open_session.execute("SELECT 1")  # its backend was terminated by the restart
    open_session.close()
    assert _scalar(url, "SELECT string_agg(v, ',') FROM t") == "committed"
    if mode == "immediate":
        assert "automatic recovery in progress" in private_postgres.log_tail(100)


@pytest.mark.parametrize("mode", ["fast", "immediate", "smart"])
def test_stop_refuses_connections_until_start(
    private_postgres: PrivatePostgres, mode: StopMode
) -> None:
    url = private_postgres.url()
    private_postgres.stop(mode)

    assert not private_postgres.is_running()
    assert private_postgres.pid is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    private_postgres.stop(mode)  # stopping a stopped server does nothing

    private_postgres.start()
    assert private_postgres.is_running()
    assert _scalar(url, "SELECT 1") == 1


def test_stop_rejects_an_unknown_mode(private_postgres: PrivatePostgres) -> None:
    with pytest.raises(ValueError, match="mode"):
        private_postgres.stop("sudden")  # type: ignore[arg-type]
    assert private_postgres.is_running()


def test_private_database_is_migrated(
    private_postgres: PrivatePostgres, private_database_url: str
) -> None:
    params = conninfo_to_dict(private_database_url)
    assert int(str(params["port"])) == private_postgres.port
    assert params["dbname"] == "tasker"
    schemas = _scalar(
        private_database_url,
        "SELECT array_agg(nspname::text ORDER BY nspname) FROM pg_namespace"
        " WHERE nspname IN ('tasker', 'pgmq')",
    )
    assert schemas == ["pgmq", "tasker"]
    assert _scalar(private_database_url, "SELECT count(*) FROM tasker.schema_migrations") > 0


def test_cleanup_stops_the_server_and_deletes_its_directory() -> None:
    server = PrivatePostgres()
    try:
        server.start()
        pid = server.pid
        assert pid is not None
        assert _pid_exists(pid)
        assert (server.data_dir / "PG_VERSION").exists()
        client = psycopg.connect(server.url())  # an open session does not block the cleanup
        server.cleanup()
        client.close()
        assert not server.base_dir.exists()
        assert not _pid_exists(pid)
        assert not server.is_running()
        server.cleanup()  # twice is fine
        with pytest.raises(PrivatePostgresError, match="cleaned up"):
            server.start()
    finally:
        server.cleanup()


def test_context_manager_starts_and_cleans_up() -> None:
    with PrivatePostgres() as server:
        assert server.is_running()
        assert _scalar(server.url(), "SELECT current_user") == "postgres"
        base_dir = server.base_dir
    assert not base_dir.exists()


def test_a_failed_start_reports_the_server_log() -> None:
    server = PrivatePostgres(settings={"shared_buffers": "'lots'"})
    with pytest.raises(PrivatePostgresError, match="lots") as failure:
        server.__enter__()  # what `with PrivatePostgres(...)` does; it cleans up on failure
    assert "last lines of" in str(failure.value)
    assert not server.base_dir.exists()

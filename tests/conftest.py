"""Shared fixtures: a real PostgreSQL for every test that touches SQL.

The server is ``$TEST_DATABASE_URL`` when set (CI sets it to the system PostgreSQL 15), else
the embedded PostgreSQL 18 under ``.tasker/pgdata-test``. Once per session a template database is
migrated; every test gets its own database cloned from it, so tests are isolated and fast.
Tests that stop or restart PostgreSQL use ``private_postgres`` instead: a server of their own.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tasker.brokers.pgmq import PGMQBroker
from tasker.db.migrate import migrate
from tests.private_postgres import PrivatePostgres
from tests.support import InProcessFlows

ROOT = Path(__file__).resolve().parent.parent


def _server_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from tasker.db.embedded import embedded_url

    return embedded_url(ROOT / ".tasker" / "pgdata-test", database="postgres")


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (as a libpq key=value string)."""
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params)


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    with _admin(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(statement)
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with _admin(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def pytest_configure(config: pytest.Config) -> None:
    """A cancelled run (SIGTERM, as CI, `timeout` or `kill` send it) ends as Ctrl-C does: the
    fixtures are torn down and the embedded PostgreSQL the run started is stopped by its exit
    handler, where Python would otherwise die at once and leave the server running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _restore_tasker_environment() -> Iterator[None]:
    """The CLI sets TASKER_ENV / TASKER_SETTINGS_FILE for its child processes; undo that (and
    any other TASKER_* change) after each test so settings never leak into the next one."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("TASKER_")}
    yield
    for key in [k for k in os.environ if k.startswith("TASKER_")]:
        if key not in saved:
            del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def server_url() -> str:
    """An admin URL of the PostgreSQL server the suite runs against."""
    return _server_url()


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A migrated template database, created once per test session."""
    name = f"tasker_tpl_{os.getpid()}"
    url = create_database(server_url, name)
    migrate(url)
    yield name
    drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"tasker_t_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name, template=template_database)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with nothing installed (for migration tests)."""
    name = f"tasker_e_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def broker(database_url: str) -> Iterator[PGMQBroker]:
    """A PGMQBroker on the test's database, set as Dramatiq's global broker."""
    broker = PGMQBroker(url=database_url, visibility_timeout_ms=5_000, poll_interval_ms=200)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.close()


@pytest.fixture
def worker(broker: PGMQBroker) -> Iterator[dramatiq.Worker]:
    """A started in-process worker (2 threads) on ``broker``."""
    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def app_db(database_url: str) -> str:
    """The test's database with the tables the test actors of tests/workers write to."""
    from tests.workers.actors import SCHEMA

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return database_url


@pytest.fixture
def producer(app_db: str) -> Iterator[PGMQBroker]:
    """A broker on ``app_db`` for sending messages to worker subprocesses."""
    broker = PGMQBroker(url=app_db)
    yield broker
    broker.close()


@pytest.fixture
def flows(broker: PGMQBroker, database_url: str) -> Iterator[InProcessFlows]:
    """Workflows run by an in-process worker on the test's database (see InProcessFlows)."""
    runner = InProcessFlows(broker, database_url)
    yield runner
    runner.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started PostgreSQL server of this test's own, free to stop, crash and restart.

    Same major version as the suite's server; stopped and deleted after the test, pass or fail.
    """
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_database_url(private_postgres: PrivatePostgres) -> str:
    """A migrated database (PGMQ and the tasker schema) on the test's private server."""
    url = private_postgres.create_database("tasker")
    migrate(url)
    return url

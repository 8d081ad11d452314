"""Actors for the supervisor tests, run as `tasker worker tests.workers.dying`.

* ``die_once(key)`` kills its worker process with ``os._exit(1)`` the first time it runs for
  ``key`` (remembered in ``test_deaths``) and records its effect in ``test_ledger`` the next time.
* ``work`` and ``die`` of :mod:`tests.workers.actors` are declared too (that module is imported).
* With ``TEST_WORKER_EXIT_AT_BOOT=1`` in the environment, importing this module ends the process
  with exit code 1: a worker process that dies every time it starts.
"""

from __future__ import annotations

import os

import dramatiq
import psycopg

from tests.workers import actors
from tests.workers.actors import _execute, _log

if os.environ.get("TEST_WORKER_EXIT_AT_BOOT") == "1":
    os._exit(1)

SCHEMA = actors.SCHEMA  # test_deaths is created there too


def _first_death(key: str) -> bool:
    """Record that ``key`` kills its process; false when it already did once."""
    with psycopg.connect(os.environ["TASKER_DATABASE__URL"], autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO test_deaths (key, pid) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            " RETURNING key",
            (key, os.getpid()),
        ).fetchone()
    return row is not None


@dramatiq.actor(max_retries=0)
def die_once(key: str) -> None:
    _log("start", key)
    if _first_death(key):
        os._exit(1)
    _execute(
        "INSERT INTO test_ledger (key, pid) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (key, os.getpid()),
    )
    _log("end", key)

"""Actors run by `dramatiq tasker.actors tests.workers.actors` in worker subprocesses.

Every run writes to ``test_exec_log`` (one row per start and end, no unique key, so duplicate
executions are visible) and to ``test_ledger`` (unique per key: the effect, recorded once).
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS test_exec_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL, key text NOT NULL, pid int NOT NULL, read_ct int,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS test_ledger (key text PRIMARY KEY, pid int NOT NULL);
CREATE TABLE IF NOT EXISTS test_deaths (key text PRIMARY KEY, pid int NOT NULL);
"""


def _execute(statement: str, params: tuple[Any, ...]) -> None:
    for attempt in range(50):  # survive a PostgreSQL restart while logging
        try:
            with psycopg.connect(os.environ["TASKER_DATABASE__URL"], autocommit=True) as conn:
                conn.execute(statement, params)
            return
        except psycopg.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.2)


def _log(kind: str, key: str) -> None:
    message = CurrentMessage.get_current_message()
    read_ct = getattr(message, "read_ct", None)
    _execute(
        "INSERT INTO test_exec_log (kind, key, pid, read_ct) VALUES (%s, %s, %s, %s)",
        (kind, key, os.getpid(), read_ct),
    )


@dramatiq.actor(max_retries=5, min_backoff=100, max_backoff=500)
def work(key: str, sleep_s: float = 0.0) -> None:
    _log("start", key)
    time.sleep(sleep_s)
    _execute(
        "INSERT INTO test_ledger (key, pid) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (key, os.getpid()),
    )
    _log("end", key)


@dramatiq.actor(max_retries=0)
def die(key: str) -> None:
    _log("start", key)
    os._exit(3)

"""The worker registry: each worker process heartbeats a row of ``tasker.workers``.

The coordinator reads it to count live replicas per queue (scaling hints) and to tell a dead
worker from a slow one; ``tasker workers`` lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tasker.engine.sql import cq

__all__ = [
    "WorkerRow",
    "deregister_worker",
    "heartbeat_worker",
    "list_workers",
    "register_worker",
    "some_live_worker_has",
]


@dataclass(frozen=True)
class WorkerRow:
    """One registered worker process; ``live`` when its heartbeat is recent."""

    worker_uuid: Any
    hostname: str
    pid: int
    queues: list[str]
    threads: int
    tasker_version: str
    started_at: datetime
    last_seen: datetime
    in_flight: int
    processed: int
    failed: int
    live: bool


def register_worker(
    conn: Any,
    worker_uuid: str,
    *,
    hostname: str,
    pid: int,
    queues: list[str],
    actors: list[str],
    threads: int,
    version: str,
) -> None:
    """Insert (or refresh) the row of this worker process."""
    conn.execute(
        cq("register_worker"),
        {
            "worker": worker_uuid,
            "hostname": hostname,
            "pid": pid,
            "queues": queues,
            "actors": actors,
            "threads": threads,
            "version": version,
        },
    )


def heartbeat_worker(
    conn: Any, worker_uuid: str, *, in_flight: int, processed: int, failed: int
) -> bool:
    """Refresh ``last_seen`` and the counters; False when the row is gone (forgotten)."""
    params = {
        "worker": worker_uuid,
        "in_flight": in_flight,
        "processed": processed,
        "failed": failed,
    }
    return conn.execute(cq("heartbeat_worker"), params).fetchone() is not None


def deregister_worker(conn: Any, worker_uuid: str) -> None:
    """Delete the row of a worker that stops cleanly."""
    conn.execute(cq("deregister_worker"), {"worker": worker_uuid})


def list_workers(conn: Any, *, live_s: float) -> list[WorkerRow]:
    """Every registered worker; ``live`` when seen within ``live_s`` seconds."""
    with conn.cursor(row_factory=class_row(WorkerRow)) as cursor:
        return list(cursor.execute(cq("list_workers"), {"live_s": live_s}))


def some_live_worker_has(conn: Any, actor: str, *, live_s: float) -> bool:
    """Whether a worker seen within ``live_s`` seconds declared ``actor``."""
    return bool(conn.execute(cq("live_actor"), {"actor": actor, "live_s": live_s}).fetchone()[0])

"""Retention: finished tasks are deleted after a while, in batches that keep every lock short.

A batch deletes at most ``batch`` finished tasks (oldest first; their steps, edges, transitions,
claims, DLQ entries and finalization audit go with them) in one short transaction, skipping rows
another session has locked. Expired finalization claims are cleared, old coordinator records
trimmed and workers gone for a day forgotten.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from tasker.engine.sql import cq

__all__ = ["DEFAULT_BATCH", "RetentionReport", "apply_retention"]

#: Tasks deleted per transaction.
DEFAULT_BATCH = 500
#: Seconds one retention pass may delete for; the rest is left to the next pass.
DEFAULT_BUDGET_S = 10.0
_FORGET_WORKERS_AFTER_S = 24 * 3600


@dataclass(frozen=True)
class RetentionReport:
    """What one pass deleted, and the longest batch (seconds)."""

    tasks: int
    batches: int
    longest_batch_s: float
    claims: int
    actions: int
    workers: int
    dead_letters_expired: int = 0  # by the broker, after the pass (dead_message_ttl_s)


def apply_retention(
    conn: Any,
    *,
    days: float,
    batch: int = DEFAULT_BATCH,
    budget_s: float = DEFAULT_BUDGET_S,
    coordinator: str,
) -> RetentionReport:
    """One pass: batches of ``batch`` tasks finished more than ``days`` days ago, each its own
    transaction and recorded, until none is left or ``budget_s`` seconds have gone (the rest
    waits for the next pass, so the coordinator's other work is not held up)."""
    deleted = batches = 0
    longest = 0.0
    began = time.monotonic()
    while True:
        started = time.monotonic()
        with conn.transaction():
            rows = conn.execute(cq("delete_finished_tasks"), {"days": days, "batch": batch})
            count = len(rows.fetchall())
            if count:
                _record(conn, coordinator, tasks=count)
        longest = max(longest, time.monotonic() - started)
        deleted += count
        batches += 1 if count else 0
        if count < batch or time.monotonic() - began >= budget_s:
            break
    claims = len(conn.execute(cq("clear_expired_claims")).fetchall())
    actions = conn.execute(cq("trim_actions"), {"days": days, "batch": batch * 10}).rowcount
    workers = len(
        conn.execute(cq("forget_dead_workers"), {"seconds": _FORGET_WORKERS_AFTER_S}).fetchall()
    )
    return RetentionReport(deleted, batches, longest, claims, actions, workers)


def _record(conn: Any, coordinator: str, **detail: Any) -> None:
    conn.execute(
        cq("record_action"),
        {
            "action": "retention_batch",
            "task": None,
            "step": None,
            "detail": json.dumps(detail),
            "coordinator": coordinator,
        },
    )

"""Operations on queues for people and tools: depth, dead letters, replay, purge.

These open their own short connection; they are used by the ``tasker`` CLI and the future HTTP API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg

from tasker.brokers.queue_names import DEAD_LETTER_SUFFIX, QueueNames, map_queue_name
from tasker.db.connection import connect
from tasker.db.queries import render
from tasker.exceptions import QueueNameError, QueueNotFoundError

__all__ = [
    "QueueStats",
    "dead_letter_summary",
    "list_dead_letters",
    "purge_dead_letters",
    "queue_stats",
    "replay_dead_letters",
]


@dataclass(frozen=True)
class QueueStats:
    """Depth of one PGMQ queue and its dead-letter queue."""

    queue: str
    visible: int
    delayed: int
    leased: int
    dead: int
    oldest_visible_s: float


#: What ``tasker queues create`` prints before a PGMQ name: the schema and table prefix.
_TABLE_PREFIX = "pgmq.q_"


def _statement(name: str, names: QueueNames) -> str:
    return render("broker", name, queue=names.table, dead=names.dead_table)


def _existing_queue(conn: psycopg.Connection[Any], queue: str, namespace: str) -> QueueNames:
    """The names of queue ``queue``: a Dramatiq queue name (``default``), the PGMQ name that
    ``tasker queues`` prints (``tasker_default``), or its table as ``tasker queues create``
    prints it (``pgmq.q_tasker_default``); :class:`QueueNotFoundError` when PGMQ has no such
    queue with its dead-letter queue. A Dramatiq name wins when both exist."""
    try:
        names = map_queue_name(queue, namespace)
    except QueueNameError:
        names = None
    if names is not None and _exists(conn, names):
        return names
    for pgmq_name in (queue, queue.removeprefix(_TABLE_PREFIX)):
        as_pgmq = QueueNames(dramatiq=queue, main=pgmq_name)  # SQL identifiers are quoted
        if _exists(conn, as_pgmq) and _exists_main(conn, as_pgmq):
            return as_pgmq
    raise QueueNotFoundError(
        f"No queue named {queue!r} in namespace {namespace!r} (a queue exists once a message "
        "was sent to it, or `tasker queues create MODULES` made it); `tasker queues` lists the "
        f"queues, by PGMQ name ({namespace}_<queue>), and either name works here."
    )


def _exists_main(conn: psycopg.Connection[Any], names: QueueNames) -> bool:
    row = conn.execute("SELECT 1 FROM pgmq.meta WHERE queue_name = %s", (names.main,)).fetchone()
    return row is not None


def _exists(conn: psycopg.Connection[Any], names: QueueNames) -> bool:
    row = conn.execute(_statement("queue_exists", names), {"name": names.dead}).fetchone()
    return row is not None


def queue_stats(url: str) -> list[QueueStats]:
    """Depth of every PGMQ queue that has a Tasker dead-letter queue beside it."""
    with connect(url) as conn:
        all_queues = {row[0] for row in conn.execute("SELECT queue_name FROM pgmq.meta")}
        stats = []
        for main in sorted(q for q in all_queues if q + DEAD_LETTER_SUFFIX in all_queues):
            names = QueueNames(dramatiq=main, main=main)
            row = conn.execute(_statement("queue_stats", names)).fetchone()
            dead = conn.execute(_statement("count_dead", names)).fetchone()
            assert row is not None and dead is not None
            stats.append(
                QueueStats(main, int(row[0]), int(row[1]), int(row[2]), int(dead[0]), float(row[3]))
            )
    return stats


def list_dead_letters(
    url: str, queue: str, *, namespace: str, limit: int = 50
) -> list[dict[str, Any]]:
    """Dead letters of Dramatiq queue ``queue``: id, time, headers (error) and message.

    Raises :class:`QueueNotFoundError` when the queue does not exist (so do the functions below).
    """
    with connect(url) as conn:
        names = _existing_queue(conn, queue, namespace)
        rows = conn.execute(_statement("list_dead_letters", names), {"limit": limit}).fetchall()
    return [
        {
            "msg_id": msg_id,
            "dead_lettered_at": enqueued_at.isoformat(),
            "headers": json.loads(headers or "{}"),
            "message": json.loads(message),
        }
        for msg_id, enqueued_at, message, headers in rows
    ]


def replay_dead_letters(
    url: str, queue: str, *, namespace: str, msg_ids: list[int], replay_all: bool = False
) -> int:
    """Move dead letters back onto their queue (visible at once); returns how many moved."""
    with connect(url) as conn, conn.transaction():
        names = _existing_queue(conn, queue, namespace)
        cursor = conn.execute(
            _statement("replay_dead_letters", names), {"msg_ids": msg_ids, "all": replay_all}
        )
        moved = cursor.rowcount
        if moved:
            conn.execute(_statement("notify", names), {"channel": names.channel})
    return moved


def dead_letter_summary(url: str, queue: str, *, namespace: str) -> tuple[int, int]:
    """How many dead letters ``queue`` has, and the msg_id of the last one (0 for none)."""
    with connect(url) as conn:
        names = _existing_queue(conn, queue, namespace)
        row = conn.execute(_statement("dead_letter_summary", names)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def purge_dead_letters(url: str, queue: str, *, namespace: str, through: int | None = None) -> int:
    """Delete every dead letter of ``queue`` (with ``through``, only those whose msg_id is at
    most that: the ones a person was shown); returns how many were deleted."""
    with connect(url) as conn:
        names = _existing_queue(conn, queue, namespace)
        if through is None:
            return conn.execute(_statement("flush_dead", names)).rowcount
        cursor = conn.execute(_statement("flush_dead_through", names), {"through": through})
        return cursor.rowcount

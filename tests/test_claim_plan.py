"""The claim statement stays O(batch) however many delayed messages wait ahead of the ready ones."""

from __future__ import annotations

from typing import Any

import dramatiq
import psycopg

from tasker.brokers.pgmq import PGMQBroker

DELAYED = 100_000


def test_claim_uses_the_vt_index_with_100k_delayed_messages(
    broker: PGMQBroker, db: psycopg.Connection[Any]
) -> None:
    @dramatiq.actor
    def noop() -> None: ...

    names = broker.names(noop.queue_name)
    broker.ensure_queue(names)
    db.execute(
        "INSERT INTO pgmq.q_tasker_default (vt, message, headers)"
        " SELECT now() + interval '3 days', '{}'::jsonb, '{}'::jsonb"
        " FROM generate_series(1, %s)",
        (DELAYED,),
    )
    for _ in range(10):
        noop.send()
    db.execute("ANALYZE pgmq.q_tasker_default")
    claim = broker.statement("claim", names)
    params = {"limit": 4, "lease_ms": 30_000}
    literal = claim.replace("%(limit)s", "4").replace("%(lease_ms)s", "30000")
    plan = "\n".join(row[0] for row in db.execute("EXPLAIN (ANALYZE, BUFFERS) " + literal))
    assert "q_tasker_default_vt_idx" in plan, plan
    assert "Index Cond: (vt <= now())" in plan, plan
    assert "Rows Removed by Filter" not in plan, plan
    rows = db.execute(claim, params).fetchall()
    assert len(rows) == 4

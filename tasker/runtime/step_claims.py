"""The step claim folded into the message claim (decision 0014).

:class:`StepCoClaimer` is the PGMQ broker's :class:`~tasker.brokers.co_claim.CoClaimer` for
Tasker's step queues: the consumer's claim statement (``claim_messages_and_steps`` in
``sql/queries/engine.sql``) also claims the step of each first delivery, so a step costs one
transaction fewer. Only a delivery that passed every check that must not cost an attempt is
claimed that way:

* its actor is a step actor this worker has (an unknown actor's message goes back to its queue);
* the step has no circuit breaker (a breaker is passed before the claim, in the worker);
* it is the message's first delivery and the step is ``enqueued`` (a redelivery may meet a claim
  this process still holds, which the executor checks first);
* its task is not final (``tasker.claim_step_v2`` refuses it, as in the worker).

Everything else is claimed by the worker as before. Deliveries given back unrun (a shutdown
requeues what Dramatiq had not started) return their attempt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from tasker.brokers.consumer import PGMQMessageProxy
from tasker.brokers.pgmq import PGMQBroker
from tasker.brokers.queue_names import QueueNames
from tasker.db.queries import render
from tasker.engine.sql import q
from tasker.engine.sql_outcomes import ClaimOutcome

__all__ = ["StepCoClaimer"]

logger = logging.getLogger(__name__)


class StepCoClaimer:
    """Claims the steps of first deliveries on the queues of the step actors added to it."""

    def __init__(self, broker: PGMQBroker) -> None:
        self.broker = broker
        self._lock = threading.Lock()
        self._actors: dict[str, list[str]] = {}  # PGMQ queue -> actor names
        #: PGMQ queue -> its actor names as one array literal: a namespace may hold thousands
        #: of step actors, and dumping them as a list on every claim cost more than the claim
        self._literals: dict[str, str] = {}
        self._statements: dict[str, str] = {}

    def add(self, queue_name: str, actor_name: str) -> None:
        """Claim the steps of ``actor_name``'s messages on ``queue_name`` with the messages."""
        names = self.broker.names(queue_name)
        with self._lock:
            actors = self._actors.setdefault(names.main, [])
            if actor_name not in actors:
                self._actors[names.main] = actors = [*actors, actor_name]
                self._literals[names.main] = _array_literal(actors)

    def claim_statement(self, names: QueueNames) -> tuple[str, dict[str, Any]] | None:
        """The folded claim for a queue with step actors (None for any other queue)."""
        actors = self._literals.get(names.main)
        if actors is None:
            return None
        statement = self._statements.get(names.main)
        if statement is None:
            statement = render("engine", "claim_messages_and_steps", queue=names.table)
            self._statements[names.main] = statement
        params = {
            "actors": actors,
            "queue_name": names.main,
            "step_lease_ms": self.broker.visibility_timeout_ms,
        }
        return statement, params

    def give_back(self, deliveries: Sequence[PGMQMessageProxy]) -> None:
        """Return the attempts of steps claimed with deliveries that never ran."""
        held = [
            (str(d.args[1]), int(d.co_claim["attempt"]))
            for d in deliveries
            if isinstance(d.co_claim, dict) and d.co_claim.get("outcome") == ClaimOutcome.CLAIMED
        ]
        if not held:
            return
        params = {"steps": [s for s, _ in held], "attempts": [a for _, a in held]}
        try:
            with self.broker.pool.connection() as conn:
                conn.execute(q("release_step_claims"), params)
        except Exception:  # their leases run out instead; the next delivery re-claims them
            logger.warning("Could not give back %d step claim(s)", len(held), exc_info=True)


def _array_literal(values: Sequence[str]) -> str:
    """``values`` as a PostgreSQL text array literal (``{"a","b"}``), every element quoted."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"

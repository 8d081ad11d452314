"""Work claimed with the message: an extension point of the PGMQ consumer's claim.

A layer above the broker (Tasker's step actors) may claim its own row for a message in the same
statement, and so the same commit, as the message itself: the step claim folded into the message
claim (decision 0014). The broker knows nothing of what is claimed; it runs the statement the
:class:`CoClaimer` gives for a queue, hands each delivery the extra column
(:attr:`~tasker.brokers.consumer.PGMQMessageProxy.co_claim`), and tells the co-claimer about
deliveries it gives back unrun (a shutdown's requeue), so their claims can be returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tasker.brokers.consumer import PGMQMessageProxy
    from tasker.brokers.queue_names import QueueNames

__all__ = ["CoClaimer"]


class CoClaimer(Protocol):
    """Claims something with each message of the queues it chooses."""

    def claim_statement(self, names: QueueNames) -> tuple[str, dict[str, Any]] | None:
        """The claim statement for ``names`` and its extra parameters, or None for the broker's
        plain claim.

        The statement takes the plain claim's parameters (``limit``, ``lease_ms``) and returns
        its four columns (``msg_id``, ``read_ct``, ``message`` text, ``headers`` text) and a
        fifth: what was claimed with the message (NULL: nothing).
        """
        ...

    def give_back(self, deliveries: Sequence[PGMQMessageProxy]) -> None:
        """These deliveries, claimed with something, go back to their queue unrun."""
        ...

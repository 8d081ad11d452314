"""Group-commit acknowledgements: many worker threads' acks become one DELETE.

A worker thread that acks a message hands ``(msg_id, read_ct)`` to the :class:`AckBatcher` and waits
until the DELETE that includes it has committed, so ack-late semantics are unchanged (Dramatiq's
``after_ack`` still fires after the message is durably gone). While one DELETE runs, the next acks
queue up behind it, so under load one statement and one commit settle many messages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tasker.brokers.errors import BrokerConnectionError
from tasker.brokers.queue_names import QueueNames

__all__ = ["AckBatcher"]

logger = logging.getLogger(__name__)

DeleteMany = Callable[[QueueNames, list[int], list[int]], set[int]]


@dataclass
class _PendingAck:
    msg_id: int
    read_ct: int
    done: threading.Event = field(default_factory=threading.Event)
    deleted: bool = False
    error: BaseException | None = None


class AckBatcher(threading.Thread):
    """One thread per process that deletes acknowledged messages in batches."""

    def __init__(self, delete_many: DeleteMany, *, max_batch: int = 500) -> None:
        super().__init__(name="tasker-acker", daemon=True)
        self._delete_many = delete_many
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[QueueNames, list[_PendingAck]]] = {}
        self._stopping = False

    def ack(self, names: QueueNames, msg_id: int, read_ct: int, *, timeout: float = 120.0) -> bool:
        """Delete one delivery; True if it was still there (the lease was not lost)."""
        pending = _PendingAck(msg_id, read_ct)
        with self._cond:
            if self._stopping:
                raise BrokerConnectionError("the broker is closed; it cannot acknowledge messages")
            self._pending.setdefault(names.main, (names, []))[1].append(pending)
            self._cond.notify()
        if not pending.done.wait(timeout):
            raise BrokerConnectionError(
                f"the ack of message {msg_id} did not complete in {timeout}s; is PostgreSQL "
                "reachable?"
            )
        if pending.error is not None:
            raise pending.error
        return pending.deleted

    def stop(self) -> None:
        """Finish the acks already handed over, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if not self._pending and self._stopping:
                    return
                batches, self._pending = self._pending, {}
            for names, items in batches.values():
                for start in range(0, len(items), self._max_batch):
                    self._settle(names, items[start : start + self._max_batch])

    def _settle(self, names: QueueNames, items: list[_PendingAck]) -> None:
        try:
            deleted = self._delete_many(
                names, [p.msg_id for p in items], [p.read_ct for p in items]
            )
        except BaseException as exc:  # handed to every waiting worker thread
            for pending in items:
                pending.error = exc
                pending.done.set()
            return
        for pending in items:
            pending.deleted = pending.msg_id in deleted
            pending.done.set()

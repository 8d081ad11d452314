"""The consuming side of PGMQBroker: one consumer per Dramatiq ConsumerThread.

Claims are batched and index-friendly, the read-ahead buffer is given back on close, and rows that
cannot run (poison, undecodable) go to the dead-letter queue instead of stopping the consumer.

Every claim tells the broker's database breaker (:mod:`tasker.breakers.database`) whether
PostgreSQL answered. While the breaker is open, consumers claim nothing: they wait for its probe,
quietly, and the messages wait in their queues.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psycopg
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.common import current_millis
from dramatiq.message import Message

from tasker.brokers.encoding import decode_message, encode_message
from tasker.brokers.errors import connection_closed
from tasker.brokers.queue_names import QueueNames
from tasker.exceptions import PayloadError

if TYPE_CHECKING:
    from tasker.brokers.pgmq import PGMQBroker

__all__ = ["PGMQConsumer", "PGMQMessageProxy"]

logger = logging.getLogger(__name__)

_BOUNCE_FIRST_MS = 1_000
_BOUNCE_MAX_MS = 30_000


class PGMQMessageProxy(MessageProxy):
    """A delivered message with its PGMQ identity (``msg_id``, ``read_ct``)."""

    def __init__(self, message: Message[Any], names: QueueNames, msg_id: int, read_ct: int):
        super().__init__(message)
        self.pgmq_names = names
        self.msg_id = msg_id
        self.read_ct = read_ct
        self.redelivered = read_ct > 1
        # True once the delivery was disposed of other than by an ack (deleted in the handler's
        # own transaction, deferred, or replaced by a retry): the consumer must not delete it.
        self.settled = False

    @property
    def token(self) -> str:
        """This delivery's identity: PGMQ queue, message id and delivery count."""
        return f"{self.pgmq_names.main}:{self.msg_id}:{self.read_ct}"


class PGMQConsumer(Consumer):
    """Consumes one queue for one Dramatiq ``ConsumerThread``.

    ``__next__`` runs in the consumer thread, ``ack``/``nack`` in worker threads and ``requeue`` in
    the main thread; shared state is the broker's lease registry and a locked read-ahead buffer.

    As Dramatiq's own consumers do, ``ack``, ``nack`` and ``requeue`` ignore (and log at debug)
    a message this consumer did not deliver: anything but a :class:`PGMQMessageProxy`.
    """

    def __init__(
        self,
        broker: PGMQBroker,
        names: QueueNames,
        *,
        prefetch: int,
        timeout_ms: int,
        wake: threading.Event | None,
    ) -> None:
        self.broker = broker
        self.names = names
        self.prefetch = max(prefetch, 1)
        self.timeout_s = timeout_ms / 1000
        self.wake = wake
        self._buffer: deque[PGMQMessageProxy] = deque()
        self._buffer_lock = threading.Lock()
        self._woken = False
        self._next_due: float | None = None

    def __next__(self) -> MessageProxy | None:
        try:
            return self._next()
        except psycopg.OperationalError as exc:
            breaker = self.broker.database_breaker
            breaker.record_failure(exc)
            if not breaker.is_closed():
                return None  # the breaker logs it, and the next call waits for its probe
            raise connection_closed(exc) from exc

    def _next(self) -> MessageProxy | None:
        with self._buffer_lock:
            if self._buffer:
                return self._buffer.popleft()
        broker = self.broker
        if broker.stopping.is_set():
            time.sleep(min(self.timeout_s, 0.1))
            return None
        breaker = broker.database_breaker
        if not breaker.allow():
            breaker.wait(self.timeout_s)
            return None
        room = self.prefetch - broker.leases.count(self.names.main)
        if room <= 0:
            broker.leases.wait_for_room(self.names.main, self.prefetch, self.timeout_s)
            return None
        if self.wake is not None:
            self.wake.clear()
        proxies = self._claim(min(room, broker.claim_batch))
        breaker.record_success()
        if proxies:
            with self._buffer_lock:
                self._buffer.extend(proxies[1:])
            return proxies[0]
        self._idle_wait()
        return None

    def _claim(self, limit: int) -> list[PGMQMessageProxy]:
        broker, names = self.broker, self.names
        params = {"limit": limit, "lease_ms": broker.visibility_timeout_ms}
        with broker.consumer_pool.connection() as conn:
            rows = conn.execute(broker.statement("claim", names), params).fetchall()
        rows.sort(key=lambda row: row[0])
        for msg_id, read_ct, _, _ in rows:
            broker.leases.hold(names.main, msg_id, read_ct)
        return [p for p in (self._accept(*row) for row in rows) if p is not None]

    def _accept(
        self, msg_id: int, read_ct: int, payload: str, headers_text: str | None
    ) -> PGMQMessageProxy | None:
        """Turn a claimed row into a proxy, dead-lettering poison and undecodable rows."""
        try:
            headers = json.loads(headers_text) if headers_text else {}
            message = decode_message(payload, headers)
        except (PayloadError, ValueError) as exc:
            self._dead_letter_raw(msg_id, read_ct, str(exc))
            return None
        if message.actor_name not in self.broker.actors:
            self._put_back_unknown(msg_id, read_ct, message, headers)
            return None
        reason = self.broker.poison_reason(read_ct, headers)
        if reason is not None and self.broker.checks_poison(message.actor_name):
            self._dead_letter_raw(msg_id, read_ct, reason)
            return None
        return PGMQMessageProxy(message, self.names, msg_id, read_ct)

    def _put_back_unknown(
        self, msg_id: int, read_ct: int, message: Message[Any], headers: dict[str, Any]
    ) -> None:
        """A message for an actor this worker does not have is not run nor dead-lettered: it goes
        back to its queue for a worker that has the actor (a rolling deploy), 1 s later, doubling
        up to 30 s, counted neither as a start nor as a delivery (``returned``)."""
        bounces = int(headers.get("bounces", 0))
        delay_ms = min(_BOUNCE_FIRST_MS * 2 ** min(bounces, 10), _BOUNCE_MAX_MS)
        self.broker.note_unknown_actor(message)
        params = {"msg_id": msg_id, "read_ct": read_ct, "delay_ms": delay_ms}
        with self.broker.consumer_pool.connection() as conn:
            conn.execute(self.broker.statement("bounce", self.names), params)
        self.broker.leases.release(self.names.main, msg_id, read_ct)

    def _dead_letter_raw(self, msg_id: int, read_ct: int, reason: str) -> None:
        logger.error("Dead-lettering message %s of %s: %s", msg_id, self.names.dramatiq, reason)
        extra = json.dumps({"error": reason, "dead_lettered_from": self.names.main})
        params = {"msg_id": msg_id, "read_ct": read_ct, "extra": extra}
        with self.broker.consumer_pool.connection() as conn:
            conn.execute(self.broker.statement("dead_letter_raw", self.names), params)
        self.broker.leases.release(self.names.main, msg_id, read_ct)

    def _idle_wait(self) -> None:
        """Sleep until woken, the next delayed message is due, or the poll interval passes.

        When a wake-up found nothing (another process claimed first), the known due time is
        reused instead of asking the database again.
        """
        now = time.monotonic()
        wait_s = min(self.timeout_s, self.broker.poll_interval_ms / 1000)
        if not self._woken:
            with self.broker.consumer_pool.connection() as conn:
                row = conn.execute(self.broker.statement("next_visible_in", self.names)).fetchone()
            in_ms = row[0] if row is not None else None
            self._next_due = None if in_ms is None else now + max(in_ms, 1) / 1000
        if self._next_due is not None:
            wait_s = max(min(wait_s, self._next_due - now), 0.001)
        if self.wake is not None:
            self._woken = self.wake.wait(wait_s)
        else:
            time.sleep(wait_s)

    def ack(self, message: MessageProxy) -> None:
        """Delete the message (fenced by its delivery's ``read_ct``)."""
        proxy = _delivered(message, "ack")
        if proxy is None:
            return
        if proxy.settled:
            self.broker.leases.release(self.names.main, proxy.msg_id, proxy.read_ct)
            return
        # ConnectionClosed propagates: Dramatiq retries the ack, and the lease is kept meanwhile.
        deleted = self.broker.acker().ack(self.names, proxy.msg_id, proxy.read_ct)
        self.broker.leases.release(self.names.main, proxy.msg_id, proxy.read_ct)
        if not deleted:
            logger.warning(
                "Ack of message %s on %s found no delivery: its lease expired and it was "
                "delivered again (it may run twice)",
                proxy.msg_id,
                self.names.dramatiq,
            )

    def nack(self, message: MessageProxy) -> None:
        """Move the message, with its final options and the error, to the dead-letter queue."""
        proxy = _delivered(message, "nack")
        if proxy is None:
            return
        error = proxy._exception
        encoded = encode_message(
            proxy._message,
            error=repr(error) if error is not None else "failed",
            dead_lettered_from=self.names.main,
            failed_at_ms=current_millis(),
        )
        params = {
            "msg_id": proxy.msg_id,
            "read_ct": proxy.read_ct,
            "message": encoded.payload,
            "headers": encoded.headers,
        }
        try:
            with self.broker.consumer_pool.connection() as conn:
                moved = conn.execute(self.broker.statement("dead_letter", self.names), params)
                moved_rows = moved.rowcount
        except psycopg.OperationalError as exc:
            raise connection_closed(exc) from exc
        self.broker.leases.release(self.names.main, proxy.msg_id, proxy.read_ct)
        if not moved_rows:
            logger.warning("Nack of message %s found no delivery (lease lost)", proxy.msg_id)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Make unprocessed messages visible again at once (graceful shutdown)."""
        proxies = [p for p in (_delivered(m, "requeue") for m in messages) if p is not None]
        if not proxies:
            return
        params = {
            "msg_ids": [p.msg_id for p in proxies],
            "read_cts": [p.read_ct for p in proxies],
        }
        with self.broker.consumer_pool.connection() as conn:
            conn.execute(self.broker.statement("release", self.names), params)
        for proxy in proxies:
            self.broker.leases.release(self.names.main, proxy.msg_id, proxy.read_ct)

    def close(self) -> None:
        """Give back the read-ahead buffer (messages Dramatiq never saw)."""
        with self._buffer_lock:
            buffered = list(self._buffer)
            self._buffer.clear()
        try:
            self.requeue(buffered)
        except psycopg.Error:
            logger.warning(
                "Could not requeue %d buffered message(s); their leases will expire",
                len(buffered),
                exc_info=True,
            )


def _delivered(message: object, action: str) -> PGMQMessageProxy | None:
    """``message`` if a PGMQ consumer delivered it; else None, logged: Dramatiq's contract is
    that a consumer ignores what it did not deliver (a plain ``Message``, another broker's
    proxy)."""
    if isinstance(message, PGMQMessageProxy):
        return message
    logger.debug("Ignoring the %s of a message PGMQ did not deliver: %r", action, message)
    return None

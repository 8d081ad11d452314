"""PGMQBroker: a Dramatiq broker whose queues are PGMQ queues in PostgreSQL.

Every Dramatiq queue is a PGMQ queue (``pgmq.q_<namespace>_<name>``) with a dead-letter queue
beside it (``..__xq``). Delays use PGMQ's visibility timeout, so delayed messages wait in the
database, not in worker memory. Delivery is at-least-once with ack-late:

* a consumer claims visible messages with one index-friendly statement and leases them;
* a heartbeat (:class:`~tasker.brokers.leases.LeaseKeeper`) extends the leases while handlers run;
* ``ack`` deletes the row, ``nack`` moves it to the dead-letter queue with the error, both fenced by
  the delivery's ``read_ct`` so a worker that lost its lease cannot touch the next delivery;
* graceful shutdown makes prefetched but unstarted messages visible again at once;
* a message delivered more than ``max_deliveries`` times (its workers keep dying) is dead-lettered;
* a database breaker per process (``database_breaker``) stops the consumers from claiming while
  PostgreSQL is unreachable, and lets them go again after a successful probe.

``with broker.use_connection(conn):`` makes enqueues join the caller's transaction: rolled back,
nothing was sent and nobody was woken up.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from psycopg_pool import ConnectionPool, PoolTimeout

from tasker.breakers.database import DEFAULT_DATABASE_POLICY, DatabaseBreaker
from tasker.breakers.policy import BreakerPolicy
from tasker.brokers.acks import AckBatcher
from tasker.brokers.consumer import PGMQConsumer, PGMQMessageProxy
from tasker.brokers.encoding import encode_message
from tasker.brokers.errors import (
    DeadLetteredError,
    QueueJoinTimeoutError,
    QueueNotFoundError,
    connection_closed,
)
from tasker.brokers.leases import HeldMessage, LeaseHook, LeaseKeeper, LeaseRegistry
from tasker.brokers.listener import Listener
from tasker.brokers.queue_names import DEAD_LETTER_SUFFIX, QueueNames, map_queue_name
from tasker.db.connection import DEFAULT_TIMEOUT_S, connection_kwargs, make_pool
from tasker.db.errors import database_error, is_transient
from tasker.db.queries import render
from tasker.exceptions import ConfigurationError, DatabaseError, QueueNameError

__all__ = ["DeadLetteredError", "PGMQBroker", "PGMQConsumer", "PGMQMessageProxy"]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "tasker"
DEFAULT_VISIBILITY_TIMEOUT_MS = 60_000
DEFAULT_MAX_LEASE_MS = 900_000
DEFAULT_MAX_DELIVERIES = 20
DEFAULT_CLAIM_BATCH = 4
DEFAULT_POLL_INTERVAL_MS = 1_000
DEFAULT_DEAD_MESSAGE_TTL_S = 7 * 24 * 3600

_Connection = psycopg.Connection[Any]
_current_connection: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "tasker_broker_connection", default=None
)


class _Lifecycle(Middleware):
    """Stops fetching as soon as a worker begins shutting down (prefetched work is requeued),
    and counts the starts of redelivered messages for poison detection.

    Actor option ``poison_check`` (default True): False for actors that bound their own attempts
    (workflow steps: their claims count attempts and fail the step when they run out), whose
    messages must never be dead-lettered behind the engine's back.
    """

    def __init__(self, broker: PGMQBroker) -> None:
        self.broker = broker

    @property
    def actor_options(self) -> set[str]:
        return {"poison_check"}

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        self.broker.stopping.clear()

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        self.broker.stopping.set()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if (
            isinstance(message, PGMQMessageProxy)
            and message.redelivered
            and self.broker.checks_poison(message.actor_name)
        ):
            self.broker.record_start(message)


class PGMQBroker(Broker):
    """A Dramatiq broker over PGMQ queues in PostgreSQL.

    Parameters:
      url: libpq URL of the database (PGMQ installed by ``tasker db migrate``); or pass ``pool``.
      namespace: prefix of every PGMQ queue this broker owns.
      visibility_timeout_ms: lease of a delivered message, extended by a heartbeat while it runs.
      heartbeat_interval_ms: how often leases are extended (default: a quarter of the lease).
      max_lease_ms: leases are not extended past this age, so a hung handler lets go eventually.
      max_deliveries: a message delivered more often than this is dead-lettered (poison).
      claim_batch: messages claimed per round trip.
      listen: wake consumers with LISTEN/NOTIFY (turn off behind PgBouncer transaction pooling).
      poll_interval_ms: fallback poll of idle consumers.
      dead_message_ttl_s: dead letters older than this are deleted by periodic maintenance.
      auto_create_queues: create PGMQ queues on first use.
      timeout_s: bounds opening a connection and waiting for a pooled one (seconds).
      durable_consumer_commits: commit claims, acks and lease extensions synchronously. Off by
        default: such a commit lost in a *server* crash only makes a message run again, while
        waiting for the WAL flush adds a disk sync to every claim. Sends are always synchronous.
      database_policy: when the process's database breaker (``database_breaker``) opens and
        probes again (:data:`~tasker.breakers.database.DEFAULT_DATABASE_POLICY`).
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        pool: ConnectionPool[_Connection] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        middleware: list[Middleware] | None = None,
        visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS,
        heartbeat_interval_ms: int | None = None,
        max_lease_ms: int = DEFAULT_MAX_LEASE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        claim_batch: int = DEFAULT_CLAIM_BATCH,
        listen: bool = True,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
        dead_message_ttl_s: int = DEFAULT_DEAD_MESSAGE_TTL_S,
        auto_create_queues: bool = True,
        durable_consumer_commits: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pool_max_size: int = 16,
        application_name: str = "tasker-broker",
        database_policy: BreakerPolicy = DEFAULT_DATABASE_POLICY,
    ) -> None:
        super().__init__(middleware=middleware)
        if url is None and pool is None:
            raise ConfigurationError("PGMQBroker needs url= (a PostgreSQL URL) or pool=.")
        if visibility_timeout_ms < 1000:
            raise ConfigurationError("visibility_timeout_ms must be at least 1000 (one second).")
        heartbeat = heartbeat_interval_ms or visibility_timeout_ms // 4
        if heartbeat * 2 >= visibility_timeout_ms:
            raise ConfigurationError(
                "heartbeat_interval_ms must be less than half the visibility timeout."
            )
        map_queue_name("default", namespace)  # validates the namespace now, not at first send
        if url is None and pool is not None and isinstance(pool.conninfo, str):
            url = pool.conninfo  # the listener needs its own connection
        self.url = url
        self.namespace = namespace
        self.visibility_timeout_ms = visibility_timeout_ms
        self.heartbeat_interval_ms = heartbeat
        self.max_lease_ms = max_lease_ms
        self.max_deliveries = max_deliveries
        self.claim_batch = claim_batch
        self.listen = listen
        self.poll_interval_ms = poll_interval_ms
        self.dead_message_ttl_s = dead_message_ttl_s
        self.auto_create_queues = auto_create_queues
        self.durable_consumer_commits = durable_consumer_commits
        self.timeout_s = timeout_s
        self.stopping = threading.Event()
        self.queues: dict[str, QueueNames] = {}
        self._by_pgmq_name: dict[str, str] = {}
        self._external_pool = pool
        self._pool_max_size = pool_max_size
        self._application_name = application_name
        self._sql_cache: dict[tuple[str, str], str] = {}
        #: The process's database breaker: consumers and the step executor report to it.
        self.database_breaker = DatabaseBreaker(self._probe_database, policy=database_policy)
        self.lease_hooks: list[LeaseHook] = []
        #: Called with each message put back because no actor of this broker has its name.
        self.unknown_actor_hooks: list[Callable[[Message[Any]], object]] = []
        self._reset_process_state()
        self.add_middleware(_Lifecycle(self))

    # -- process-local state (re-made after fork) ------------------------------------------

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._state_lock = threading.Lock()
        self._pool: ConnectionPool[_Connection] | None = self._external_pool
        self._consumer_pool: ConnectionPool[_Connection] | None = self._external_pool
        self._created: set[str] = set()
        self._unknown_logged: set[str] = set()
        self.leases = LeaseRegistry()
        self._keeper: LeaseKeeper | None = None
        self._listener: Listener | None = None
        self._acker: AckBatcher | None = None
        self._closed = False
        self.database_breaker.reset()  # its lock may have been held by a thread of the parent

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._reset_process_state()

    @property
    def pool(self) -> ConnectionPool[_Connection]:
        """The pool for sends and your own transactions (opened on first use, re-made after a
        fork). Its commits are synchronous: an acknowledged send survives a server crash."""
        self._check_fork()
        if self._pool is None:
            with self._state_lock:
                if self._pool is None:
                    self._pool = self._open_pool(synchronous_commit=True)
        return self._pool

    @property
    def consumer_pool(self) -> ConnectionPool[_Connection]:
        """The pool for claims, acks and leases (see ``durable_consumer_commits``)."""
        if self.durable_consumer_commits:
            return self.pool
        self._check_fork()
        if self._consumer_pool is None:
            with self._state_lock:
                if self._consumer_pool is None:
                    self._consumer_pool = self._open_pool(synchronous_commit=False)
        return self._consumer_pool

    def _open_pool(self, *, synchronous_commit: bool) -> ConnectionPool[_Connection]:
        assert self.url is not None
        pool = make_pool(
            self.url,
            min_size=1,
            max_size=self._pool_max_size,
            application_name=self._application_name,
            synchronous_commit=synchronous_commit,
            timeout_s=self.timeout_s,
        )
        pool.open(wait=False)
        return pool

    def _probe_database(self) -> None:
        """The database breaker's probe: one ``SELECT 1`` on a pooled connection."""
        with self.consumer_pool.connection() as conn:
            conn.execute(render("broker", "probe"))

    # -- names and SQL -----------------------------------------------------------------------

    def names(self, queue_name: str) -> QueueNames:
        """PGMQ names of a declared Dramatiq queue."""
        try:
            return self.queues[queue_name]
        except KeyError:
            raise QueueNotFoundError(
                f"Queue {queue_name!r} is not declared on this broker; declare it "
                "(broker.declare_queue) or import the module that defines its actors."
            ) from None

    def statement(self, name: str, names: QueueNames) -> str:
        key = (name, names.main)
        text = self._sql_cache.get(key)
        if text is None:
            text = render("broker", name, queue=names.table, dead=names.dead_table)
            self._sql_cache[key] = text
        return text

    # -- Dramatiq broker contract -------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue (no I/O: the PGMQ queue is created on first use)."""
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        names = map_queue_name(queue_name, self.namespace)
        owner = self._by_pgmq_name.get(names.main)
        if owner is not None and owner != queue_name:
            raise QueueNameError(
                f"Queues {owner!r} and {queue_name!r} map to the same PGMQ queue "
                f"{names.main!r}; rename one of them."
            )
        self.queues[queue_name] = names
        self._by_pgmq_name[names.main] = queue_name
        self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    def get_declared_delay_queues(self) -> set[str]:
        return set()  # delays are native PGMQ visibility timeouts

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Send ``message`` (after ``delay`` ms); inside ``use_connection`` it joins that
        transaction."""
        if isinstance(message, PGMQMessageProxy):
            return self._reschedule(message, delay)
        plain: Message[Any] = getattr(message, "_message", message)
        names = self.names(plain.queue_name)
        self.emit_before("enqueue", plain, delay)
        encoded = encode_message(plain)
        delay_ms = max(int(delay or 0), 0)
        if delay_ms == 0 and self.listen:
            query = self.statement("send_and_notify", names)
        else:
            query = self.statement("send", names)
        params = {
            "message": encoded.payload,
            "headers": encoded.headers,
            "delay_ms": delay_ms,
            "channel": names.channel,
        }
        self._write(names, lambda conn: conn.execute(query, params))
        self.emit_after("enqueue", plain, delay)
        return plain

    def enqueue_batch(
        self, messages: Sequence[Message[Any]], *, delay: int | None = None
    ) -> list[Message[Any]]:
        """Send many messages with one statement per queue (atomically with each other)."""
        by_queue: dict[str, list[Message[Any]]] = {}
        for message in messages:
            plain = getattr(message, "_message", message)
            by_queue.setdefault(plain.queue_name, []).append(plain)
        delay_ms = max(int(delay or 0), 0)
        for queue_name, batch in by_queue.items():
            names = self.names(queue_name)
            for message in batch:
                self.emit_before("enqueue", message, delay)
            encoded = [encode_message(m) for m in batch]
            params = {
                "messages": [e.payload for e in encoded],
                "headers": [e.headers for e in encoded],
                "delay_ms": delay_ms,
                "channel": names.channel,
            }

            def send(conn: _Connection, names: QueueNames = names, params: Any = params) -> None:
                conn.execute(self.statement("send_batch", names), params)
                if delay_ms == 0 and self.listen:
                    conn.execute(self.statement("notify", names), params)

            self._write(names, send, transaction=True)
            for message in batch:
                self.emit_after("enqueue", message, delay)
        return [getattr(m, "_message", m) for m in messages]

    def _reschedule(self, proxy: PGMQMessageProxy, delay: int | None) -> Message[Any]:
        """Enqueueing a delivered message (a retry): replace the delivery atomically.

        The delivery counts as settled from here on, whatever happens: if the replacement fails,
        the original stays leased and comes back when its lease runs out.
        """
        plain: Message[Any] = proxy._message
        if proxy.settled:
            return plain  # already deleted, deferred or replaced
        proxy.settled = True
        names = proxy.pgmq_names
        self.emit_before("enqueue", plain, delay)
        encoded = encode_message(plain)
        delay_ms = max(int(delay or 0), 0)
        params = {
            "msg_id": proxy.msg_id,
            "read_ct": proxy.read_ct,
            "message": encoded.payload,
            "headers": encoded.headers,
            "delay_ms": delay_ms,
            "channel": names.channel,
        }

        def replace(conn: _Connection) -> None:
            replaced = conn.execute(self.statement("replace", names), params).fetchone()
            if replaced is not None and delay_ms == 0 and self.listen:
                conn.execute(self.statement("notify", names), params)

        self._write(names, replace, transaction=True)
        self.emit_after("enqueue", plain, delay)
        return plain

    def defer(self, proxy: PGMQMessageProxy, delay_ms: int) -> bool:
        """Make a delivered message visible again after ``delay_ms`` without counting a handler
        start (it waits, it did not crash); the consumer will not acknowledge it.

        Returns False when the delivery's lease was already lost. Raises
        :class:`~tasker.brokers.errors.BrokerConnectionError` when PostgreSQL cannot be reached
        (the delivery then comes back when its lease runs out).
        """
        proxy.settled = True
        params = {"msg_id": proxy.msg_id, "read_ct": proxy.read_ct, "delay_ms": max(delay_ms, 0)}
        try:
            with self.consumer_pool.connection() as conn:
                row = conn.execute(self.statement("defer", proxy.pgmq_names), params).fetchone()
        except psycopg.OperationalError as exc:
            raise connection_closed(exc) from exc
        finally:
            self.leases.release(proxy.pgmq_names.main, proxy.msg_id, proxy.read_ct)
        return row is not None

    @contextlib.contextmanager
    def use_connection(self, conn: _Connection) -> Iterator[_Connection]:
        """Make enqueues in this block run on ``conn``, inside the caller's transaction."""
        token = _current_connection.set(conn)
        try:
            yield conn
        finally:
            _current_connection.reset(token)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        """A consumer of ``queue_name`` holding at most ``prefetch`` messages at a time."""
        names = self.names(queue_name)
        try:
            self.ensure_queue(names)
        except psycopg.OperationalError as exc:
            raise connection_closed(exc) from exc
        self._start_keeper()
        wake = self._wake_event(names)
        return PGMQConsumer(self, names, prefetch=prefetch, timeout_ms=timeout, wake=wake)

    def flush(self, queue_name: str) -> None:
        """Delete every message of the queue and its dead letters."""
        names = self.names(queue_name)
        self.ensure_queue(names)
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(self.statement("flush", names))
            conn.execute(self.statement("flush_dead", names))
        self.leases.forget_queue(names.main)

    def flush_all(self) -> None:
        """Flush every declared queue."""
        for queue_name in list(self.queues):
            self.flush(queue_name)

    def join(
        self,
        queue_name: str,
        *,
        timeout: int | None = None,
        fail_fast: bool = False,
        min_successes: int = 2,
        interval_ms: int = 50,
    ) -> None:
        """Wait until the queue holds no message (visible, delayed or in progress).

        Raises ``QueueJoinTimeout`` after ``timeout`` ms, and with ``fail_fast`` raises
        ``DeadLetteredError`` as soon as one of its messages is dead-lettered.
        """
        names = self.names(queue_name)
        self.ensure_queue(names)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        with self.pool.connection() as conn:
            first_dead = conn.execute(self.statement("last_dead_letter_id", names)).fetchone()
        successes = 0
        while successes < min_successes:
            with self.pool.connection() as conn:
                remaining = conn.execute(self.statement("count", names)).fetchone()
                dead = conn.execute(self.statement("last_dead_letter_id", names)).fetchone()
            if fail_fast and dead != first_dead:
                raise DeadLetteredError(f"A message of queue {queue_name!r} was dead-lettered.")
            successes = successes + 1 if remaining == (0,) else 0
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeoutError(queue_name)
            time.sleep(interval_ms / 1000)

    def close(self) -> None:
        """Stop the heartbeat and listener threads and close the pool."""
        with self._state_lock:
            self._closed = True
            keeper, listener, acker = self._keeper, self._listener, self._acker
            pools = {id(p): p for p in (self._pool, self._consumer_pool) if p is not None}
            self._keeper = self._listener = self._acker = None
            if self._external_pool is None:
                self._pool = self._consumer_pool = None
        for thread in (acker, keeper, listener):
            if thread is not None:
                thread.stop()
                thread.join(timeout=5)
        for pool in pools.values():
            if pool is not self._external_pool:
                pool.close()

    # -- queue lifecycle ----------------------------------------------------------------------

    def ensure_queue(self, names: QueueNames, *, create: bool | None = None) -> None:
        """Create the PGMQ queue and its dead-letter queue once (cached per process).

        ``create`` defaults to ``auto_create_queues``; when false, a missing queue is an error.
        """
        self._check_fork()
        if names.main in self._created:
            return
        with self.pool.connection() as conn:
            exists = conn.execute(
                self.statement("queue_exists", names), {"name": names.dead}
            ).fetchone()
            if not exists:
                if not (self.auto_create_queues if create is None else create):
                    raise DatabaseError(
                        f"PGMQ queue {names.main!r} (Dramatiq queue {names.dramatiq!r}) does not "
                        "exist; run `tasker queues create MODULES` or enable "
                        "broker.auto_create_queues."
                    )
                with conn.transaction():
                    conn.execute(self.statement("create_queue", names), {"name": names.main})
                    conn.execute(self.statement("tune_queue", names))
                    conn.execute(self.statement("create_queue", names), {"name": names.dead})
        self._created.add(names.main)

    # -- helpers used by consumers --------------------------------------------------------------

    def _write(self, names: QueueNames, action: Any, *, transaction: bool = False) -> None:
        caller = _current_connection.get()
        if caller is not None:
            self.ensure_queue(names)
            action(caller)
            return
        for attempt in (1, 2):
            try:
                self.ensure_queue(names)
                with self.pool.connection() as conn:
                    if transaction:
                        with conn.transaction():
                            action(conn)
                    else:
                        action(conn)
                return
            except psycopg.Error as exc:
                if not is_transient(exc):
                    raise database_error(exc, url=self.url) from exc
                if attempt == 2 or isinstance(exc, PoolTimeout):  # the pool waited its timeout
                    raise connection_closed(exc) from exc
                logger.warning("Enqueue failed on a broken connection (%s); retrying once", exc)
                self.pool.drain()  # the repeat gets a new session, not a dying one

    def _wake_event(self, names: QueueNames) -> threading.Event | None:
        if not self.listen or self.url is None:
            return None
        with self._state_lock:
            if self._closed:
                return None
            if self._listener is None:
                self._listener = Listener(
                    self.url,
                    connection_kwargs(
                        application_name=self._application_name + "-listen",
                        timeout_s=self.timeout_s,
                    ),
                )
            listener = self._listener
        return listener.watch(names.channel)

    def _start_keeper(self) -> None:
        with self._state_lock:
            if self._keeper is None and not self._closed:
                self._keeper = LeaseKeeper(
                    self.leases,
                    self._extend_leases,
                    interval_s=self.heartbeat_interval_ms / 1000,
                    max_lease_s=self.max_lease_ms / 1000,
                    periodic=self.expire_dead_letters,
                    hooks=self.lease_hooks,
                )
                self._keeper.start()

    def release_held(self) -> int:
        """Make every message this process holds visible again at once, and give up the other
        leases kept by its heartbeat (``lease_hooks``); for a forced exit, where the handlers
        holding them will not finish. Returns how many messages were released."""
        released = 0
        for queue, held in self.leases.held().items():
            names = self.names(self._by_pgmq_name[queue])
            params = {"msg_ids": [m.msg_id for m in held], "read_cts": [m.read_ct for m in held]}
            try:
                with self.consumer_pool.connection() as conn:
                    conn.execute(self.statement("release", names), params)
                released += len(held)
            except psycopg.Error:
                logger.warning("Could not release %d lease(s) on %s", len(held), queue)
            self.leases.forget_queue(queue)
        for hook in list(self.lease_hooks):
            try:
                hook.release()
            except Exception:
                logger.warning("Could not release the leases of %r", hook, exc_info=True)
        return released

    def acker(self) -> AckBatcher:
        """The process's ack batcher (started on first use)."""
        self._check_fork()
        with self._state_lock:
            if self._acker is None:
                self._acker = AckBatcher(self._delete_acked)
                self._acker.start()
            return self._acker

    def _delete_acked(self, names: QueueNames, msg_ids: list[int], read_cts: list[int]) -> set[int]:
        params = {"msg_ids": msg_ids, "read_cts": read_cts}
        for attempt in (1, 2):  # a fenced delete is safe to repeat on a fresh connection
            try:
                with self.consumer_pool.connection() as conn:
                    rows = conn.execute(self.statement("ack_many", names), params).fetchall()
                return {row[0] for row in rows}
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise connection_closed(exc) from exc
        raise AssertionError("unreachable")

    def _extend_leases(self, queue: str, held: list[HeldMessage]) -> set[int]:
        names = self.names(self._by_pgmq_name[queue])
        params = {
            "lease_ms": self.visibility_timeout_ms,
            "msg_ids": [m.msg_id for m in held],
            "read_cts": [m.read_ct for m in held],
        }
        with self.consumer_pool.connection() as conn:
            rows = conn.execute(self.statement("extend_leases", names), params).fetchall()
        return {row[0] for row in rows}

    def delete_in_transaction(self, conn: _Connection, message: PGMQMessageProxy) -> None:
        """Delete a delivered message on the caller's connection, so the ack commits with the
        caller's transaction (set ``message.settled`` after the commit). Fenced by ``read_ct``: a
        lost lease deletes nothing. The result is not read, so it pipelines."""
        params = {"msg_ids": [message.msg_id], "read_cts": [message.read_ct]}
        conn.execute(self.statement("ack_many", message.pgmq_names), params)

    def delete_task_messages(
        self, conn: _Connection, queue_name: str, task_uuid: str, *, keep: Sequence[str] = ()
    ) -> int:
        """Delete, on the caller's connection, the messages of ``queue_name`` whose first
        argument is ``task_uuid`` (the engine's step and stage messages), except the step
        messages of the step ids in ``keep``; returns how many. A queue never created holds
        nothing. Dead letters are left alone."""
        names = map_queue_name(queue_name, self.namespace)
        exists = conn.execute("SELECT to_regclass(%s)", (f"pgmq.q_{names.main}",)).fetchone()
        if exists is None or exists[0] is None:
            return 0
        params = {"task": str(task_uuid), "keep": [str(step) for step in keep]}
        return conn.execute(self.statement("delete_task_messages", names), params).rowcount

    def note_unknown_actor(self, message: Message[Any]) -> None:
        """A message for an actor this broker does not have was put back: log it once per actor
        and tell the ``unknown_actor_hooks``."""
        with self._state_lock:
            first = message.actor_name not in self._unknown_logged
            self._unknown_logged.add(message.actor_name)
        if first:
            logger.warning(
                "No actor %r here: its messages on %r go back to the queue for a worker that has "
                "it (a rolling deploy?), with a growing delay",
                message.actor_name,
                message.queue_name,
            )
        for hook in list(self.unknown_actor_hooks):
            try:
                hook(message)
            except Exception:
                logger.debug("An unknown-actor hook failed", exc_info=True)

    def checks_poison(self, actor_name: str) -> bool:
        """False for actors declared with ``poison_check=False`` (see :class:`_Lifecycle`)."""
        actor = self.actors.get(actor_name)
        return actor is None or bool(actor.options.get("poison_check", True))

    def poison_reason(self, read_ct: int, headers: dict[str, Any]) -> str | None:
        """Why a delivery must be dead-lettered instead of run, or None.

        Only redelivered messages record that their handler started, so a message prefetched
        beside one whose handler kills its worker is not blamed for those crashes.
        """
        if read_ct <= 1:
            return None
        started = 1 + int(headers.get("starts", 0))
        if started >= self.max_deliveries:
            return (
                f"its handler started {started} times without finishing (max_deliveries="
                f"{self.max_deliveries}): the workers processing it keep dying"
            )
        delivered = read_ct - int(headers.get("returned", 0))  # put back on purpose: not held
        if delivered > max(100, 10 * self.max_deliveries):
            return f"delivered {delivered} times without being acknowledged"
        return None

    def record_start(self, message: PGMQMessageProxy) -> None:
        """Count a start of a redelivered message's handler (see ``poison_reason``)."""
        names = message.pgmq_names
        params = {"msg_id": message.msg_id, "read_ct": message.read_ct}
        try:
            with self.consumer_pool.connection() as conn:
                conn.execute(self.statement("record_start", names), params)
        except psycopg.OperationalError:
            logger.warning("Could not record the start of message %s", message.msg_id)

    def expire_all_dead_letters(self) -> int:
        """Delete dead letters older than ``dead_message_ttl_s`` from every dead-letter queue of
        this broker's namespace in the database, declared by this process or not (the
        coordinator's retention pass declares none); the count deleted."""
        params = {
            "prefix": self.namespace + "_",
            "suffix": DEAD_LETTER_SUFFIX,
            "suffix_len": len(DEAD_LETTER_SUFFIX),
        }
        with self.pool.connection() as conn:
            rows = conn.execute(render("broker", "dead_letter_queues"), params).fetchall()
        deleted = 0
        for (dead,) in rows:
            main = dead[: -len(DEAD_LETTER_SUFFIX)]
            with self.pool.connection() as conn:
                cursor = conn.execute(
                    self.statement("expire_dead_letters", QueueNames(main, main)),
                    {"ttl_s": self.dead_message_ttl_s},
                )
                deleted += cursor.rowcount
        return deleted

    def expire_dead_letters(self) -> int:
        """Delete dead letters older than ``dead_message_ttl_s`` from every declared queue."""
        deleted = 0
        for names in list(self.queues.values()):
            if names.main not in self._created:
                continue
            with self.pool.connection() as conn:
                cursor = conn.execute(
                    self.statement("expire_dead_letters", names),
                    {"ttl_s": self.dead_message_ttl_s},
                )
                deleted += cursor.rowcount
        return deleted

"""One LISTEN connection shared by all the blocked waits of a backend (:class:`Listener`).

A daemon thread owns one autocommit connection, opened on the first blocking wait that needs it
and kept afterwards (until the backend's ``close()`` or a connection failure). Waits
register their channel (:meth:`Listener.subscribe`); the thread LISTENs on a channel while at
least one wait is registered on it and UNLISTENs it when the last one leaves, so a wait costs
one round trip on an open connection instead of a new connection.

Registration and wake-up
  The thread sleeps in ``selectors`` on two sockets: the connection's and the read end of a
  ``socket.socketpair`` (a self-pipe that, unlike ``os.pipe``, Windows can select too). A
  registration, a departure or ``close()`` writes one byte to the pair, so the thread wakes
  at once and compares the channels that waits want with the channels it LISTENs on, runs
  the missing LISTENs and the stale UNLISTENs, and only then marks the new subscriptions
  *listening* and sets their events. A wait does not trust a notification it might have
  missed before that point: it re-reads its row after its subscription is listening (see
  ``wait_until``). A channel already listened on is confirmed at registration, without a
  round trip.

  When the connection's socket is readable the thread reads it with libpq's non-blocking
  calls (``pgconn.consume_input()`` and ``pgconn.notifies()``), never with psycopg's blocking
  ``Connection.notifies()`` generator: that generator holds the connection's lock while it
  waits, so LISTEN could not be sent from another thread, and giving it a short timeout would
  delay every registration by up to that timeout. Notifications that arrive while the thread
  runs a LISTEN or UNLISTEN are handed to a notify handler by psycopg. Either way a
  notification sets the event of every wait registered on its channel; only this thread ever
  uses the connection.

Failures
  When the connection cannot be opened, or fails later, the thread ends: every registered wait
  is told (its subscription is *lost*) and polls for the rest of its wait, and the failure is
  logged once. Later waits poll too, without logging, until a backoff (1 s, doubling up to
  30 s) has passed; the first wait after it starts a new thread and connection. A failure
  after a failure is logged at debug level, and the first success again at info level.

Forks
  A listener belongs to the process that made it (:attr:`Listener.pid`): its connection and
  sockets are the parent's after a fork. The backends make a new one in a child (see
  ``LazyPool``), and leave the parent's alone: closing it in the child would end the
  parent's session.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq, sql

__all__ = ["RETRY_INITIAL_S", "RETRY_MAX_S", "Listener", "Subscription", "SubscriptionState"]

logger = logging.getLogger(__name__)

#: Seconds after a listener's failure before a wait tries a new connection; doubled after
#: every failed attempt.
RETRY_INITIAL_S = 1.0
#: Longest pause, in seconds, between two attempts to open a listening connection.
RETRY_MAX_S = 30.0
#: Seconds ``close()`` waits for the listener's thread to end.
CLOSE_TIMEOUT_S = 5.0


class SubscriptionState(enum.Enum):
    """Where a wait's registration stands."""

    #: Registered; the LISTEN has not run yet.
    PENDING = "pending"
    #: The connection LISTENs on the channel: every later notification sets the event.
    LISTENING = "listening"
    #: The listener failed or was closed: no notification will come; poll instead.
    LOST = "lost"


class Subscription:
    """One blocked wait's registration on a channel.

    ``event`` is set when the state changes and on every notification of the channel; the
    wait clears it before it re-reads its row.
    """

    __slots__ = ("channel", "event", "state")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.event = threading.Event()
        self.state = SubscriptionState.PENDING

    def _move(self, state: SubscriptionState) -> None:
        self.state = state
        self.event.set()


class _Channel:
    """The waits registered on one channel, and whether the connection LISTENs on it."""

    __slots__ = ("listening", "subscriptions")

    def __init__(self) -> None:
        self.subscriptions: set[Subscription] = set()
        self.listening = False


class _Session:
    """One run of the listener's thread: its connection and its wake-up socket pair."""

    def __init__(self) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping = False
        self.established = False
        self.backend_pid: int | None = None
        self.thread: threading.Thread | None = None

    def wake(self) -> None:
        # A full buffer holds wake-ups the thread has yet to read: one more is not needed.
        with contextlib.suppress(BlockingIOError):
            self.wake_w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(4096):
                pass

    def close_sockets(self) -> None:
        self.wake_r.close()
        self.wake_w.close()


class Listener:
    """A shared LISTEN connection that wakes the waits registered on its channels.

    ``connect`` opens the autocommit connection (in the listener's thread); ``name`` names
    the thread and the log lines.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], *, name: str) -> None:
        self._connect = connect
        self._name = name
        #: The process this listener belongs to.
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._session: _Session | None = None
        self._failures = 0  # in a row, since the last success
        self._retry_at = 0.0

    # -- waits' side ------------------------------------------------------------------------

    def subscribe(self, channel: str) -> Subscription | None:
        """Register a wait on ``channel`` and have the thread LISTEN on it.

        Starts the thread when none runs. Returns ``None`` when the wait should poll: the
        listener failed less than a backoff ago, or its thread cannot start. The caller must
        :meth:`unsubscribe` what this returns.
        """
        if os.getpid() != self.pid:
            return None  # the parent's listener; the backend makes one for this process
        with self._lock:
            session = self._session
            if session is None:
                if time.monotonic() < self._retry_at:
                    return None
                session = self._start()
                if session is None:
                    return None
            subscription = Subscription(channel)
            entry = self._channels.setdefault(channel, _Channel())
            entry.subscriptions.add(subscription)
            if entry.listening:
                subscription._move(SubscriptionState.LISTENING)
            else:
                session.wake()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget ``subscription``; the channel is UNLISTENed when no wait is left on it."""
        with self._lock:
            entry = self._channels.get(subscription.channel)
            if entry is None:
                return
            entry.subscriptions.discard(subscription)
            if not entry.subscriptions:
                del self._channels[subscription.channel]
                if self._session is not None:
                    self._session.wake()

    def close(self) -> None:
        """Stop the thread and close its connection; a later :meth:`subscribe` starts anew.

        Registered waits are told (their subscriptions are lost) and poll. Waits up to
        ``CLOSE_TIMEOUT_S`` for the thread to end. Does nothing in another process than the
        listener's: the connection is the parent's.
        """
        if os.getpid() != self.pid:
            return
        with self._lock:
            session, self._session = self._session, None
            if session is None:
                return
            session.stopping = True
            session.wake()
            self._lose_all()
        if session.thread is not None and session.thread is not threading.current_thread():
            session.thread.join(CLOSE_TIMEOUT_S)

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listening session (``None``: not connected)."""
        session = self._session
        return None if session is None else session.backend_pid

    def is_running(self) -> bool:
        """Whether the listener's thread runs (it may still be connecting)."""
        session = self._session
        return session is not None and session.thread is not None and session.thread.is_alive()

    def listening_waits(self) -> int:
        """How many registered waits the connection LISTENs for (waits on one channel count
        one each)."""
        with self._lock:
            return sum(
                subscription.state is SubscriptionState.LISTENING
                for entry in self._channels.values()
                for subscription in entry.subscriptions
            )

    # -- the thread -------------------------------------------------------------------------

    def _start(self) -> _Session | None:
        """Start a session's thread (with ``self._lock`` held)."""
        try:
            session = _Session()
        except OSError as exc:
            logger.warning("%s: cannot LISTEN (%s); blocked waits poll instead", self._name, exc)
            return None
        thread = threading.Thread(
            target=self._run, args=(session,), name=f"{self._name}-listener", daemon=True
        )
        session.thread = thread
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a new thread
            session.close_sockets()
            logger.warning("%s: cannot LISTEN (%s); blocked waits poll instead", self._name, exc)
            return None
        self._session = session
        return session

    def _run(self, session: _Session) -> None:
        failure: BaseException | None = None
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._connect()
            session.backend_pid = conn.info.backend_pid
            self._serve(session, conn)
        except Exception as exc:  # never let it escape the thread: the waits poll instead
            failure = exc
        finally:
            self._end(session, failure)
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # a broken connection may fail to close
                    logger.debug("%s: closing the LISTEN connection failed", self._name)
            session.close_sockets()

    def _serve(self, session: _Session, conn: psycopg.Connection[Any]) -> None:
        """LISTEN on what the waits want and dispatch notifications until stopped."""
        conn.add_notify_handler(lambda note: self._dispatch(note.channel))
        listening: set[str] = set()
        with selectors.DefaultSelector() as selector:
            selector.register(conn.fileno(), selectors.EVENT_READ, "db")
            selector.register(session.wake_r, selectors.EVENT_READ, "wake")
            while True:
                with self._lock:
                    if session.stopping:
                        return
                    wanted = set(self._channels)
                for channel in listening - wanted:
                    conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
                    listening.discard(channel)
                for channel in wanted - listening:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    listening.add(channel)
                self._confirm(session, listening)
                for key, _ in selector.select():
                    if key.data == "wake":
                        session.drain()
                    else:
                        self._read(conn)

    def _read(self, conn: psycopg.Connection[Any]) -> None:
        """Read what the server sent and dispatch its notifications, without blocking."""
        pgconn = conn.pgconn
        pgconn.consume_input()  # raises OperationalError when the connection is gone
        if pgconn.status != pq.ConnStatus.OK:
            raise psycopg.OperationalError("the LISTEN connection is closed")
        while (note := pgconn.notifies()) is not None:
            self._dispatch(note.relname.decode("utf-8", "replace"))

    def _dispatch(self, channel: str) -> None:
        with self._lock:
            entry = self._channels.get(channel)
            if entry is not None:
                for subscription in entry.subscriptions:
                    subscription.event.set()

    def _confirm(self, session: _Session, listening: set[str]) -> None:
        """Mark the waits on ``listening`` channels listening, and note a success."""
        recovered = False
        with self._lock:
            if self._session is not session:
                return
            for name, entry in self._channels.items():
                if not entry.listening and name in listening:
                    entry.listening = True
                    for subscription in entry.subscriptions:
                        if subscription.state is SubscriptionState.PENDING:
                            subscription._move(SubscriptionState.LISTENING)
            if not session.established:
                session.established = True
                recovered, self._failures = self._failures > 0, 0
        if recovered:
            logger.info("%s: LISTEN connection re-established", self._name)

    def _end(self, session: _Session, failure: BaseException | None) -> None:
        """Detach the ended ``session``; on ``failure``, tell its waits and back off."""
        with self._lock:
            if self._session is not session:
                return  # closed: close() told the waits
            self._session = None
            self._lose_all()
            if failure is None:
                return
            first = self._failures == 0
            backoff = min(RETRY_INITIAL_S * 2 ** min(self._failures, 16), RETRY_MAX_S)
            self._failures += 1
            self._retry_at = time.monotonic() + backoff
        what = "LISTEN connection lost" if session.established else "cannot LISTEN"
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: %s (%s); blocked waits poll, and a wait retries in %.0fs",
            self._name,
            what,
            failure,
            backoff,
        )

    def _lose_all(self) -> None:
        """Tell every registered wait that no notification will come (``self._lock`` held)."""
        for entry in self._channels.values():
            entry.listening = False
            for subscription in entry.subscriptions:
                subscription._move(SubscriptionState.LOST)

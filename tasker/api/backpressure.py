"""Backpressure of ``POST /v1/tasks``: refuse new tasks while the queues are too deep.

seed-spec §7.4: the API answers 503 with ``Retry-After`` while the deepest queue is past a limit,
so producers slow down instead of piling up work the workers cannot reach. Here the limit is
``api.max_queue_depth`` (0: off) and the answer's ``Retry-After`` is ``api.queue_retry_after_s``.
The depth is read at most every ``api.backpressure_check_s`` seconds, by the request that finds
the last reading too old while the others go on with it: one statement per interval, whatever
the request rate. An unreachable database is answered by the request itself (503 with
``api.database_retry_after_s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tasker.api.problems import ServiceUnavailableError
from tasker.client import Client
from tasker.db.queries import load_queries

__all__ = ["Backpressure", "QueueDepth"]


@dataclass(frozen=True)
class QueueDepth:
    """The deepest queue (``queue`` None: there is no queue yet) and when it was read
    (``read_at``, on the monotonic clock)."""

    queue: str | None
    depth: int
    read_at: float


class Backpressure:
    """Decides whether ``POST /v1/tasks`` is served now (thread-safe).

    ``namespace`` is ``broker.namespace`` (the deployment's queues are ``<namespace>_*``);
    ``max_depth`` 0 turns the check off.
    """

    def __init__(
        self,
        client: Client,
        *,
        namespace: str,
        max_depth: int,
        check_s: float,
        retry_after_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = f"{namespace}_"
        self.max_depth = max_depth
        self._check_s = check_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._reading = threading.Lock()
        self._last: QueueDepth | None = None

    @property
    def last(self) -> QueueDepth | None:
        """The last reading (None before the first)."""
        return self._last

    def check(self) -> None:
        """Return when a new task may be accepted; raise :class:`ServiceUnavailableError` (503,
        ``Retry-After``) while the deepest queue holds more than ``max_depth`` messages, and
        :class:`~tasker.exceptions.DatabaseUnavailableError` when the depth cannot be read."""
        if self.max_depth <= 0:
            return
        reading = self._current()
        if reading.depth > self.max_depth:
            raise ServiceUnavailableError(
                f"Queue {reading.queue} holds {reading.depth} messages, more than "
                f"api.max_queue_depth ({self.max_depth}): new tasks are refused until workers "
                f"catch up; retry after {self._retry_after_s} s.",
                retry_after_s=self._retry_after_s,
            )

    def _current(self) -> QueueDepth:
        last = self._last
        fresh = last is not None and self._clock() - last.read_at < self._check_s
        if fresh:
            assert last is not None
            return last
        # one request reads; the others keep the last reading meanwhile (if there is one)
        if not self._reading.acquire(blocking=last is None):
            assert last is not None
            return last
        try:
            last = self._last
            if last is not None and self._clock() - last.read_at < self._check_s:
                return last  # another request read it while this one waited for the lock
            self._last = self._read()
            return self._last
        finally:
            self._reading.release()

    def _read(self) -> QueueDepth:
        with self._client.connection() as conn:
            row = conn.execute(
                load_queries("api")["deepest_queue"], {"prefix": self._prefix}
            ).fetchone()
        queue, depth = (row[0], int(row[1])) if row is not None else (None, 0)
        return QueueDepth(queue=queue, depth=depth, read_at=self._clock())

"""A Dramatiq result backend that keeps results in ``tasker.dramatiq_results``.

Results are encoded with the backend's encoder and stored with an expiry computed by the
database clock. Expired rows read as missing and are deleted in small batches every
``cleanup_every`` stores, so the table needs no external janitor. Storing a result sends a
NOTIFY (migration 0006) that wakes the blocking ``get_result`` calls waiting for it.
"""

from __future__ import annotations

import itertools
from typing import Any

from dramatiq import Message
from dramatiq.encoder import Encoder
from dramatiq.results import ResultBackend, ResultMissing, ResultTimeout
from dramatiq.results.backend import DEFAULT_TIMEOUT, Missing
from psycopg_pool import ConnectionPool

from tasker.backends._common import (
    RESULT_CHANNEL_PREFIX,
    LazyPool,
    channel_name,
    delete_expired,
    query,
    wait_until,
)
from tasker.exceptions import ConfigurationError, TaskerError

__all__ = ["DEFAULT_CLEANUP_BATCH", "DEFAULT_CLEANUP_EVERY", "PostgresResultBackend"]

#: Stores between two deletions of expired results.
DEFAULT_CLEANUP_EVERY = 100
#: Most expired results deleted by one cleanup.
DEFAULT_CLEANUP_BATCH = 500


class ResultMissingError(TaskerError, ResultMissing):
    """The result is not stored (yet); Dramatiq's ``ResultMissing`` too."""

    def __init__(self, message: object) -> None:  # Dramatiq passes the Message
        super().__init__(message)  # type: ignore[no-untyped-call]


class ResultTimeoutError(TaskerError, ResultTimeout):
    """Waiting for the result took longer than the timeout; Dramatiq's ``ResultTimeout`` too."""

    def __init__(self, message: object) -> None:  # Dramatiq passes the Message
        super().__init__(message)  # type: ignore[no-untyped-call]


class PostgresResultBackend(ResultBackend):
    """Store Dramatiq message results in PostgreSQL.

    Blocking ``get_result`` calls share one more connection, outside the pool, that LISTENs
    for their results' NOTIFY: the first blocking wait opens it and it stays open until
    ``close()``.

    Parameters:
      url: A PostgreSQL URL; the backend then owns a pool, opened on first use.
      pool: An open :class:`psycopg_pool.ConnectionPool` to use instead of ``url``.
      namespace: The logical namespace of result keys.
      encoder: The encoder of stored results (Dramatiq's global encoder by default).
      use_namespace_prefix_keys: Store readable ``namespace:queue:actor:id`` keys instead of
        their MD5 digests.
      cleanup_every: Delete a batch of expired results every this many stores.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
        cleanup_every: int = DEFAULT_CLEANUP_EVERY,
    ) -> None:
        super().__init__(
            namespace=namespace,
            encoder=encoder,
            use_namespace_prefix_keys=use_namespace_prefix_keys,
        )
        if cleanup_every < 1:
            raise ConfigurationError("cleanup_every must be a positive number of stores, e.g. 100.")
        self._db = LazyPool(url=url, pool=pool, name="tasker-results")
        self._cleanup_every = cleanup_every
        self._stores = itertools.count(1)

    def close(self) -> None:
        """Close the listening connection, and the connection pool this backend opened (a
        caller's pool is left open); a later use reopens them."""
        self._db.close()

    def get_result(
        self, message: Message[Any], *, block: bool = False, timeout: int | None = None
    ) -> Any:
        """Get the result of ``message``, waiting up to ``timeout`` ms when ``block`` is true.

        ``timeout`` defaults to Dramatiq's ``DEFAULT_TIMEOUT`` (10,000 ms). A blocking wait
        that does not find the result at once has the backend's listening connection LISTEN
        for the result's notification; it re-reads the result once the LISTEN has run, on
        every notification, every ``LISTEN_FALLBACK_POLL_S`` (1 s) in case one is lost, and at
        the deadline. When the listening connection cannot be opened, or is lost, the wait
        polls with a doubling pause (10 ms up to 250 ms) instead.

        Returns the decoded result. Raises:
          ResultMissing: ``block`` is false and there is no (unexpired) result.
          ResultTimeout: ``block`` is true and no result arrived within ``timeout``.
          ResultFailure: the stored result is an exception (Dramatiq's ``unwrap_result``).
          DatabaseError: PostgreSQL is unreachable (``MigrationError``: tables missing).
        """
        message_key = self.build_message_key(message)
        found: list[Any] = []

        def probe() -> bool:
            data = self._get(message_key)
            if data is Missing:
                return False
            found.append(data)
            return True

        # Dramatiq's unwrap_result carries no annotations.
        if not block:
            if not probe():
                raise ResultMissingError(message)
        elif not wait_until(
            probe,
            DEFAULT_TIMEOUT if timeout is None else timeout,
            self._db.listener(),
            channel_name(RESULT_CHANNEL_PREFIX, message_key),
        ):
            raise ResultTimeoutError(message)
        return self.unwrap_result(found[0])  # type: ignore[no-untyped-call]

    def _get(self, message_key: str) -> Any:
        with self._db.connection() as conn:
            row = conn.execute(query("get_result"), {"key": message_key}).fetchone()
        if row is None:
            return Missing
        return self.encoder.decode(bytes(row[0]))

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        params = {"key": message_key, "result": self.encoder.encode(result), "ttl": int(ttl)}
        with self._db.connection() as conn:
            conn.execute(query("store_result"), params)
            if next(self._stores) % self._cleanup_every == 0:
                conn.execute(delete_expired("dramatiq_results"), {"limit": DEFAULT_CLEANUP_BATCH})

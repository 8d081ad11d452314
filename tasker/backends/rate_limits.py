"""A Dramatiq rate-limiter backend on ``tasker.dramatiq_rate_limits`` and its events table.

Each operation is one atomic statement (``INSERT ... ON CONFLICT`` or ``UPDATE`` under the row
lock), except ``incr_and_sum``, which first takes transaction-scoped advisory locks on every key
it reads so that concurrent sliding-window checks serialise like Redis' ``WATCH``. Expiries come
from the database clock; an expired row behaves exactly like an absent one. Expired rows are
deleted in small batches every ``cleanup_every`` writes.

``wait``/``wait_notify`` follow the Redis backend: a notification stays visible to every waiter
until its TTL runs out (Redis ``BRPOPLPUSH key key`` re-pushes the event it pops), which is what
lets one :class:`dramatiq.rate_limits.Barrier` release all the parties blocked on it. The event
row's insert also sends a NOTIFY (migration 0006) that wakes the blocked ``wait`` calls at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from dramatiq.rate_limits import RateLimiterBackend
from psycopg_pool import ConnectionPool

from tasker.backends._common import (
    EVENT_CHANNEL_PREFIX,
    LazyPool,
    channel_name,
    delete_expired,
    query,
    wait_until,
)
from tasker.exceptions import ConfigurationError

__all__ = ["ADVISORY_LOCK_CLASS", "DEFAULT_CLEANUP_EVERY", "PostgresRateLimiterBackend"]

#: Writes between two deletions of expired rate-limit rows and events.
DEFAULT_CLEANUP_EVERY = 100
#: Most expired rows deleted from each table by one cleanup.
CLEANUP_BATCH = 500
#: First key of the two-key advisory locks ``incr_and_sum`` takes (second key: hash of the key).
ADVISORY_LOCK_CLASS = 0x7A5C_0001
_BIGINT_MIN = -(2**63)
_BIGINT_MAX = 2**63 - 1

# Absent or expired counts as 0. Used when ``delta`` alone is within the bounds.
# Used when ``delta`` alone is out of bounds: only a live row can make the change valid.
Keys = Callable[[], Iterable[str]] | Iterable[str]


class PostgresRateLimiterBackend(RateLimiterBackend):
    """Keep Dramatiq rate-limiter and barrier state in PostgreSQL.

    Blocking ``wait`` calls (blocked ``Barrier`` parties) share one more connection, outside
    the pool, that LISTENs for their events' NOTIFY: the first blocking wait opens it and it
    stays open until ``close()``.

    Parameters:
      url: A PostgreSQL URL; the backend then owns a pool, opened on first use.
      pool: An open :class:`psycopg_pool.ConnectionPool` to use instead of ``url``.
      cleanup_every: Delete a batch of expired rows every this many writes.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        cleanup_every: int = DEFAULT_CLEANUP_EVERY,
    ) -> None:
        if cleanup_every < 1:
            raise ConfigurationError("cleanup_every must be a positive number of writes, e.g. 100.")
        self._db = LazyPool(url=url, pool=pool, name="tasker-rate-limits")
        self._cleanup_every = cleanup_every
        self._writes = itertools.count(1)

    def close(self) -> None:
        """Close the listening connection, and the connection pool this backend opened (a
        caller's pool is left open); a later use reopens them."""
        self._db.close()

    def add(self, key: str, value: int, ttl: int) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` ms unless it holds an unexpired value."""
        return self._write(query("add"), {"key": key, "value": value, "ttl": int(ttl)})

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` (0 when absent) unless the result exceeds ``maximum``.

        On success the key lives ``ttl`` ms from now.
        """
        return self._adjust(key, amount, _BIGINT_MIN, maximum, ttl)

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        """Subtract ``amount`` from ``key`` (0 when absent) unless the result is below ``minimum``.

        On success the key lives ``ttl`` ms from now.
        """
        return self._adjust(key, -amount, minimum, _BIGINT_MAX, ttl)

    def incr_and_sum(self, key: str, keys: Keys, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` unless it, or ``amount`` plus the sum of ``keys``, would
        exceed ``maximum``. ``keys`` is a list or a callable returning one.
        """
        summed = list(keys() if callable(keys) else keys)
        locked = sorted({key, *summed})
        params = {
            "key": key,
            "keys": summed,
            "locked": locked,
            "amount": amount,
            "maximum": maximum,
            "ttl": int(ttl),
        }
        with self._db.connection() as conn:
            with conn.transaction():
                conn.execute(
                    query("lock_keys"), {"lock_class": ADVISORY_LOCK_CLASS, "keys": locked}
                )
                done = conn.execute(query("incr_and_sum"), params).fetchone() is not None
            self._maybe_cleanup(conn)
        return done

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block up to ``timeout`` ms (forever when ``None``) for a notification on ``key``.

        A notification is not consumed: every waiter sees it until its TTL expires. A wait that
        does not find one at once has the backend's listening connection LISTEN for the
        event's NOTIFY; it re-checks once the LISTEN has run, on every notification, every
        ``LISTEN_FALLBACK_POLL_S`` (1 s) in case one is lost, and at the deadline. When the
        listening connection cannot be opened, or is lost, the wait polls with a doubling
        pause (10 ms up to 250 ms) instead.

        Returns whether a notification arrived in time (``False`` on timeout). Raises
        ``DatabaseError`` when PostgreSQL is unreachable (``MigrationError``: tables missing).
        """

        def probe() -> bool:
            with self._db.connection() as conn:
                row = conn.execute(query("has_event"), {"key": key}).fetchone()
            return bool(row and row[0])

        return wait_until(
            probe, timeout, self._db.listener(), channel_name(EVENT_CHANNEL_PREFIX, key)
        )

    def wait_notify(self, key: str, ttl: int) -> None:
        """Publish a notification on ``key`` that waiters see for ``ttl`` ms, and wake the
        waits blocked on ``key`` (a NOTIFY sent by the insert's trigger, migration 0006)."""
        self._write(query("notify"), {"key": key, "ttl": int(ttl)})

    def _adjust(self, key: str, delta: int, lower: int, upper: int, ttl: int) -> bool:
        statement = query("upsert_delta" if lower <= delta <= upper else "update_live_delta")
        params = {"key": key, "delta": delta, "lower": lower, "upper": upper, "ttl": int(ttl)}
        return self._write(statement, params)

    def _write(self, query: str, params: dict[str, Any]) -> bool:
        with self._db.connection() as conn:
            cursor = conn.execute(query, params)
            done = cursor.description is not None and cursor.fetchone() is not None
            self._maybe_cleanup(conn)
        return done

    def _maybe_cleanup(self, conn: psycopg.Connection[Any]) -> None:
        if next(self._writes) % self._cleanup_every == 0:
            conn.execute(delete_expired("dramatiq_rate_limits"), {"limit": CLEANUP_BATCH})
            conn.execute(delete_expired("dramatiq_rate_limit_events"), {"limit": CLEANUP_BATCH})

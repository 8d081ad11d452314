"""A Dramatiq rate-limiter backend on ``tasker.dramatiq_rate_limits`` and its events table.

Each operation is one atomic statement (``INSERT ... ON CONFLICT`` or ``UPDATE`` under the row
lock), except ``incr_and_sum``, which first takes transaction-scoped advisory locks on every key
it reads so that concurrent sliding-window checks serialise like Redis' ``WATCH``. Expiries come
from the database clock; an expired row behaves exactly like an absent one. Expired rows are
deleted in small batches every ``cleanup_every`` writes.

``wait``/``wait_notify`` follow the Redis backend: a notification stays visible to every waiter
until its TTL runs out (Redis ``BRPOPLPUSH key key`` re-pushes the event it pops), which is what
lets one :class:`dramatiq.rate_limits.Barrier` release all the parties blocked on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from dramatiq.rate_limits import RateLimiterBackend
from psycopg_pool import ConnectionPool

from tasker.backends._common import LazyPool, poll_until

__all__ = ["ADVISORY_LOCK_CLASS", "DEFAULT_CLEANUP_EVERY", "PostgresRateLimiterBackend"]

#: Writes between two deletions of expired rate-limit rows and events.
DEFAULT_CLEANUP_EVERY = 100
#: Most expired rows deleted from each table by one cleanup.
CLEANUP_BATCH = 500
#: First key of the two-key advisory locks ``incr_and_sum`` takes (second key: hash of the key).
ADVISORY_LOCK_CLASS = 0x7A5C_0001
_BIGINT_MIN = -(2**63)
_BIGINT_MAX = 2**63 - 1

ADD = """
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
VALUES (%(key)s, %(value)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (key) DO UPDATE
SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
WHERE r.expires_at <= clock_timestamp()
RETURNING true
"""

# Absent or expired counts as 0. Used when ``delta`` alone is within the bounds.
UPSERT_DELTA = """
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
VALUES (%(key)s, %(delta)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (key) DO UPDATE
SET value = CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value,
    expires_at = EXCLUDED.expires_at
WHERE CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value
      BETWEEN %(lower)s AND %(upper)s
RETURNING true
"""

# Used when ``delta`` alone is out of bounds: only a live row can make the change valid.
UPDATE_LIVE_DELTA = """
UPDATE tasker.dramatiq_rate_limits
SET value = value + %(delta)s,
    expires_at = clock_timestamp() + %(ttl)s * interval '1 millisecond'
WHERE key = %(key)s AND expires_at > clock_timestamp()
  AND value + %(delta)s BETWEEN %(lower)s AND %(upper)s
RETURNING true
"""

LOCK_KEYS = """
SELECT pg_advisory_xact_lock(%(lock_class)s, hashed.h)
FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(%(keys)s::text[]) AS k) AS hashed
ORDER BY hashed.h
"""

INCR_AND_SUM = """
WITH live AS (
    SELECT key, value FROM tasker.dramatiq_rate_limits
    WHERE key = ANY (%(locked)s::text[]) AND expires_at > clock_timestamp()
)
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
SELECT %(key)s, %(amount)s, clock_timestamp() + %(ttl)s * interval '1 millisecond'
WHERE (SELECT COALESCE(sum(value), 0) FROM live WHERE key = %(key)s) + %(amount)s
      <= %(maximum)s
  AND (SELECT COALESCE(sum(value), 0) FROM live WHERE key = ANY (%(keys)s::text[]))
      + %(amount)s <= %(maximum)s
ON CONFLICT (key) DO UPDATE
SET value = CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value,
    expires_at = EXCLUDED.expires_at
WHERE CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value
      <= %(maximum)s
RETURNING true
"""

NOTIFY = """
INSERT INTO tasker.dramatiq_rate_limit_events (key, expires_at)
VALUES (%(key)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
"""

HAS_EVENT = """
SELECT EXISTS (
    SELECT 1 FROM tasker.dramatiq_rate_limit_events
    WHERE key = %(key)s AND expires_at > clock_timestamp()
)
"""

DELETE_EXPIRED_LIMITS = """
DELETE FROM tasker.dramatiq_rate_limits
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM tasker.dramatiq_rate_limits
    WHERE expires_at <= clock_timestamp()
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
"""

DELETE_EXPIRED_EVENTS = """
DELETE FROM tasker.dramatiq_rate_limit_events
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM tasker.dramatiq_rate_limit_events
    WHERE expires_at <= clock_timestamp()
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
"""

Keys = Callable[[], Iterable[str]] | Iterable[str]


class PostgresRateLimiterBackend(RateLimiterBackend):
    """Keep Dramatiq rate-limiter and barrier state in PostgreSQL.

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
            raise ValueError("cleanup_every must be a positive number of writes, e.g. 100.")
        self._db = LazyPool(url=url, pool=pool, name="tasker-rate-limits")
        self._cleanup_every = cleanup_every
        self._writes = itertools.count(1)

    def close(self) -> None:
        """Close the connection pool this backend opened (a caller's pool is left open)."""
        self._db.close()

    def add(self, key: str, value: int, ttl: int) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` ms unless it holds an unexpired value."""
        return self._write(ADD, {"key": key, "value": value, "ttl": int(ttl)})

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
                conn.execute(LOCK_KEYS, {"lock_class": ADVISORY_LOCK_CLASS, "keys": locked})
                done = conn.execute(INCR_AND_SUM, params).fetchone() is not None
            self._maybe_cleanup(conn)
        return done

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block up to ``timeout`` ms (forever when ``None``) for a notification on ``key``.

        A notification is not consumed: every waiter sees it until its TTL expires.
        """

        def probe() -> bool:
            with self._db.connection() as conn:
                row = conn.execute(HAS_EVENT, {"key": key}).fetchone()
            return bool(row and row[0])

        return poll_until(probe, timeout)

    def wait_notify(self, key: str, ttl: int) -> None:
        """Publish a notification on ``key`` that waiters see for ``ttl`` ms."""
        self._write(NOTIFY, {"key": key, "ttl": int(ttl)})

    def _adjust(self, key: str, delta: int, lower: int, upper: int, ttl: int) -> bool:
        query = UPSERT_DELTA if lower <= delta <= upper else UPDATE_LIVE_DELTA
        params = {"key": key, "delta": delta, "lower": lower, "upper": upper, "ttl": int(ttl)}
        return self._write(query, params)

    def _write(self, query: str, params: dict[str, Any]) -> bool:
        with self._db.connection() as conn:
            cursor = conn.execute(query, params)
            done = cursor.description is not None and cursor.fetchone() is not None
            self._maybe_cleanup(conn)
        return done

    def _maybe_cleanup(self, conn: psycopg.Connection[Any]) -> None:
        if next(self._writes) % self._cleanup_every == 0:
            conn.execute(DELETE_EXPIRED_LIMITS, {"limit": CLEANUP_BATCH})
            conn.execute(DELETE_EXPIRED_EVENTS, {"limit": CLEANUP_BATCH})

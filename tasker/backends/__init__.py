"""Postgres-backed Dramatiq backends, so results, groups and rate limits need no Redis.

* :class:`PostgresResultBackend` for :class:`dramatiq.results.Results` (pipelines, groups).
* :class:`PostgresRateLimiterBackend` for ``ConcurrentRateLimiter``, ``WindowRateLimiter``,
  ``Barrier`` and the ``GroupCallbacks`` middleware.
"""

from __future__ import annotations

from tasker.backends.rate_limits import PostgresRateLimiterBackend
from tasker.backends.results import PostgresResultBackend

__all__ = ["PostgresRateLimiterBackend", "PostgresResultBackend"]

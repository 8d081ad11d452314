"""Wire settings to a configured PGMQBroker (the edge where configuration is read)."""

from __future__ import annotations

import logging

from dramatiq.middleware import CurrentMessage, GroupCallbacks, default_middleware
from dramatiq.results import Results

from tasker.backends import PostgresRateLimiterBackend, PostgresResultBackend
from tasker.breakers.policy import BreakerPolicy
from tasker.brokers.pgmq import PGMQBroker
from tasker.db.resolve import resolve_database_url
from tasker.settings import Settings, load_settings

__all__ = ["broker_from_settings", "database_policy"]


def broker_from_settings(
    settings: Settings | None = None, *, timeout_s: float | None = None
) -> PGMQBroker:
    """A PGMQBroker configured from settings: Dramatiq's default middleware plus CurrentMessage,
    Results and GroupCallbacks backed by PostgreSQL (no Redis needed).

    No connection is opened here; the broker connects on first use. ``timeout_s`` overrides
    ``database.timeout_s``.
    """
    settings = settings or load_settings()
    logging.getLogger("tasker").setLevel(settings.log_level)
    url = resolve_database_url(settings.database)
    b = settings.broker
    middleware = [m() for m in default_middleware]
    middleware.append(CurrentMessage())
    middleware.append(Results(backend=PostgresResultBackend(url=url)))  # type: ignore[no-untyped-call]
    middleware.append(GroupCallbacks(PostgresRateLimiterBackend(url=url)))
    return PGMQBroker(
        url=url,
        namespace=b.namespace,
        middleware=middleware,
        visibility_timeout_ms=b.visibility_timeout_ms,
        heartbeat_interval_ms=b.heartbeat_interval_ms or None,
        max_lease_ms=b.max_lease_ms,
        max_deliveries=b.max_deliveries,
        claim_batch=b.claim_batch,
        listen=b.listen,
        poll_interval_ms=b.poll_interval_ms,
        dead_message_ttl_s=b.dead_message_ttl_s,
        auto_create_queues=b.auto_create_queues,
        pool_max_size=settings.database.pool_max_size,
        timeout_s=settings.database.timeout_s if timeout_s is None else timeout_s,
        application_name=settings.database.application_name,
        database_policy=database_policy(settings),
    )


def database_policy(settings: Settings) -> BreakerPolicy:
    """The database breaker's policy from ``[breakers.database]``: failures count in a row, and
    one successful probe closes it."""
    d = settings.breakers.database
    return BreakerPolicy(
        failure_threshold=d.failure_threshold,
        window_s=d.window_s,
        open_s=d.open_s,
        half_open_successes=1,
        half_open_trials=1,
        success_resets=True,
    )

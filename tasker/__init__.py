"""Tasker: Postgres-native workflow orchestration on Dramatiq actors and PGMQ queues.

The public API is what ``__all__`` lists; everything else may change between releases.
"""

from __future__ import annotations

from tasker.backends import PostgresRateLimiterBackend, PostgresResultBackend
from tasker.brokers.pgmq import PGMQBroker
from tasker.exceptions import (
    ConfigurationError,
    DatabaseError,
    MigrationError,
    PayloadError,
    QueueNameError,
    TaskerError,
)
from tasker.settings import Settings, load_settings

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "MigrationError",
    "PGMQBroker",
    "PayloadError",
    "PostgresRateLimiterBackend",
    "PostgresResultBackend",
    "QueueNameError",
    "Settings",
    "TaskerError",
    "__version__",
    "load_settings",
]

__version__ = "0.1.0"

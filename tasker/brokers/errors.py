"""Errors of the PGMQ broker: Tasker's own types that are also the Dramatiq types its callers
(Dramatiq's worker, ``broker.join``) expect, so both ``except`` clauses work."""

from __future__ import annotations

from dramatiq.errors import ConnectionClosed, QueueJoinTimeout, QueueNotFound

from tasker.exceptions import DatabaseUnavailableError, TaskerError

__all__ = [
    "BrokerConnectionError",
    "DeadLetteredError",
    "QueueJoinTimeoutError",
    "QueueNotFoundError",
    "connection_closed",
]


class BrokerConnectionError(DatabaseUnavailableError, ConnectionClosed):
    """The broker lost its connection to PostgreSQL (Dramatiq's worker retries the operation)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]


class QueueNotFoundError(TaskerError, QueueNotFound):
    """A queue that was never declared on this broker."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]


class QueueJoinTimeoutError(TaskerError, QueueJoinTimeout):
    """``broker.join`` gave up waiting for the queue to drain."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]


class DeadLetteredError(TaskerError):
    """Raised by ``join(..., fail_fast=True)`` when a message of the queue was dead-lettered."""


def connection_closed(exc: BaseException) -> BrokerConnectionError:
    """The error to raise when a database operation of the broker lost its connection."""
    return BrokerConnectionError(
        f"Lost the connection to PostgreSQL ({exc}); check that it is running and that "
        "database.url (TASKER_DATABASE__URL) points to it."
    )

"""Tasker's exception types.

Every error Tasker raises on purpose is a :class:`TaskerError`, and every message names the fix::

    TaskerError
     ├── ConfigurationError        settings missing or invalid (names the key and the fix)
     ├── DatabaseError             PostgreSQL unreachable or refused an operation
     │    └── MigrationError       a migration failed or the schema is out of date
     ├── QueueNameError            a queue name Tasker cannot map onto PGMQ
     ├── PayloadError              a payload Tasker cannot store without changing it
     ├── TemplateNotFoundError     no registered task template with that namespace/name/version
     ├── TaskNotFoundError         no task with that id
     └── TaskTimeoutError          a task did not finish within the time waited for it

Connection loss inside the broker is raised as :class:`dramatiq.errors.ConnectionClosed`, because
that is the exception Dramatiq's worker knows how to retry.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "MigrationError",
    "PayloadError",
    "QueueNameError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "TaskerError",
    "TemplateNotFoundError",
]


class TaskerError(Exception):
    """Base class of every error Tasker raises on purpose."""


class ConfigurationError(TaskerError):
    """Settings are missing or invalid; the message names the key and how to fix it."""


class DatabaseError(TaskerError):
    """PostgreSQL could not be reached or refused an operation."""


class MigrationError(DatabaseError):
    """A migration failed, or the database schema does not match what this release expects."""


class QueueNameError(TaskerError, ValueError):
    """A queue name that cannot be mapped onto a PGMQ queue."""


class PayloadError(TaskerError, ValueError):
    """A message payload that cannot be stored or read back exactly."""


class TemplateNotFoundError(TaskerError, LookupError):
    """No registered task template matches; the message says how to register one."""


class TaskNotFoundError(TaskerError, LookupError):
    """No task has that id."""


class TaskTimeoutError(TaskerError, TimeoutError):
    """A task did not reach a final state within the time waited for it."""

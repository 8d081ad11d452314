"""Tasker's exception types.

Every error Tasker raises on purpose is a :class:`TaskerError`, and every message names the fix::

    TaskerError
     ├── ConfigurationError          settings or arguments missing or invalid (names the key)
     ├── DatabaseError               PostgreSQL refused an operation
     │    ├── DatabaseUnavailableError  PostgreSQL cannot be reached (names the URL setting)
     │    └── MigrationError         a migration failed or the schema is out of date
     ├── QueueNameError              a queue name Tasker cannot map onto PGMQ
     ├── QueueNotFoundError          no PGMQ queue for that queue name (yet)
     ├── PayloadError                a payload Tasker cannot store without changing it
     ├── WorkflowDefinitionError     a workflow definition or template that cannot run
     │    └── TemplateConflictError  a version registered again with another definition
     ├── InvalidTransitionError      a state change the state machines do not allow
     ├── TemplateNotFoundError       no registered task template with that namespace/name/version
     ├── IdempotencyConflictError    an idempotency key reused with another context
     ├── InvalidFilterError          a task listing filter, page size or cursor that cannot be used
     ├── TaskNotFoundError           no task with that id
     ├── DlqEntryNotFoundError       no task DLQ entry with that id (or it is resolved)
     ├── StepNotFoundError           no step with that name in the task
     ├── ActionNotAllowedError       a cancel or manual step action the current state refuses
     └── TaskTimeoutError            a task did not finish within the time waited for it

    UserWarning
     └── TemplateWarning             a template field accepted but without effect in Tasker

Where Dramatiq expects one of its own exception types, Tasker raises a class that is both
(:mod:`tasker.brokers.errors`): a lost connection inside the broker is a
:class:`DatabaseUnavailableError` *and* Dramatiq's ``ConnectionClosed``, which Dramatiq's worker
knows how to retry.
"""

from __future__ import annotations

__all__ = [
    "ActionNotAllowedError",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DlqEntryNotFoundError",
    "IdempotencyConflictError",
    "InvalidFilterError",
    "InvalidTransitionError",
    "MigrationError",
    "PayloadError",
    "QueueNameError",
    "QueueNotFoundError",
    "StepNotFoundError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "TaskerError",
    "TemplateConflictError",
    "TemplateNotFoundError",
    "TemplateWarning",
    "WorkflowDefinitionError",
]


class TaskerError(Exception):
    """Base class of every error Tasker raises on purpose."""


class ConfigurationError(TaskerError, ValueError):
    """Settings or arguments are missing or invalid; the message names the key and the fix."""


class DatabaseError(TaskerError):
    """PostgreSQL refused an operation."""


class DatabaseUnavailableError(DatabaseError):
    """PostgreSQL could not be reached in time; the message names the URL setting to check."""


class MigrationError(DatabaseError):
    """A migration failed, or the database schema does not match what this release expects."""


class QueueNameError(TaskerError, ValueError):
    """A queue name that cannot be mapped onto a PGMQ queue."""


class QueueNotFoundError(TaskerError, LookupError):
    """No PGMQ queue exists for that queue name; the message says how to list the queues."""


class PayloadError(TaskerError, ValueError):
    """A message payload that cannot be stored or read back exactly."""


class WorkflowDefinitionError(TaskerError, ValueError):
    """A workflow definition or template that cannot run; the message names the fix."""


class TemplateWarning(UserWarning):
    """A task template field that Tasker accepts but that changes nothing (yet); the message
    names the file and the field. Silence it with ``warnings.filterwarnings("ignore",
    category=tasker.TemplateWarning)``."""


class InvalidTransitionError(TaskerError, ValueError):
    """A state change the task or step state machine does not allow."""


class TemplateConflictError(WorkflowDefinitionError):
    """A template version registered again with a different definition; bump the version."""


class IdempotencyConflictError(TaskerError):
    """An idempotency key reused with a different context.

    ``task_uuid`` is the task the key already names.
    """

    def __init__(self, message: str, *, task_uuid: str) -> None:
        super().__init__(message)
        self.task_uuid = task_uuid


class InvalidFilterError(TaskerError, ValueError):
    """A task listing argument that cannot be used: an unknown state, a naive datetime, a page
    size out of range, a cursor that no listing returned; the message names the fix."""


class TemplateNotFoundError(TaskerError, LookupError):
    """No registered task template matches; the message says how to register one."""


class TaskNotFoundError(TaskerError, LookupError):
    """No task has that id."""


class DlqEntryNotFoundError(TaskerError, LookupError):
    """No task DLQ entry has that id, or it is already resolved."""


class StepNotFoundError(TaskerError, KeyError):
    """The task has no step with that name."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "step not found"


class ActionNotAllowedError(TaskerError):
    """A cancel or a manual step action that the task's or the step's state does not allow; the
    message names the state and what can be done instead. ``state`` is that state."""

    def __init__(self, message: str, *, state: str | None = None) -> None:
        super().__init__(message)
        self.state = state


class TaskTimeoutError(TaskerError, TimeoutError):
    """A task did not reach a final state within the time waited for it."""

"""Tasker: Postgres-native workflow orchestration on Dramatiq actors and PGMQ queues.

The public API is what ``__all__`` lists; everything else may change between releases.
"""

from __future__ import annotations

from tasker.backends import PostgresRateLimiterBackend, PostgresResultBackend
from tasker.brokers.pgmq import PGMQBroker
from tasker.client import Client
from tasker.engine.actions import ActionResult, AuditEntry, CancelResult
from tasker.engine.listing import TaskPage, TaskSummary
from tasker.engine.status import StepStatus, TaskStatus
from tasker.engine.tasks import TaskHandle
from tasker.exceptions import (
    ActionNotAllowedError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    DlqEntryNotFoundError,
    IdempotencyConflictError,
    InvalidFilterError,
    MigrationError,
    PayloadError,
    QueueNameError,
    QueueNotFoundError,
    StepNotFoundError,
    TaskerError,
    TaskNotFoundError,
    TaskTimeoutError,
    TemplateConflictError,
    TemplateNotFoundError,
    TemplateWarning,
)
from tasker.settings import Settings, load_settings
from tasker.workflow.backoff import BackoffPolicy
from tasker.workflow.definition import (
    PermanentError,
    RetryableError,
    StepContext,
    Workflow,
    WorkflowDefinitionError,
)
from tasker.workflow.states import InvalidTransitionError, StepState, TaskState

__all__ = [
    "ActionNotAllowedError",
    "ActionResult",
    "AuditEntry",
    "BackoffPolicy",
    "CancelResult",
    "Client",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DlqEntryNotFoundError",
    "IdempotencyConflictError",
    "InvalidFilterError",
    "InvalidTransitionError",
    "MigrationError",
    "PGMQBroker",
    "PayloadError",
    "PermanentError",
    "PostgresRateLimiterBackend",
    "PostgresResultBackend",
    "QueueNameError",
    "QueueNotFoundError",
    "RetryableError",
    "Settings",
    "StepContext",
    "StepNotFoundError",
    "StepState",
    "StepStatus",
    "TaskHandle",
    "TaskNotFoundError",
    "TaskPage",
    "TaskState",
    "TaskStatus",
    "TaskSummary",
    "TaskTimeoutError",
    "TaskerError",
    "TemplateConflictError",
    "TemplateNotFoundError",
    "TemplateWarning",
    "Workflow",
    "WorkflowDefinitionError",
    "__version__",
    "load_settings",
]

__version__ = "0.1.0"

"""Register the workflow templates of a worker process before it starts consuming."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from dramatiq.broker import Broker
from dramatiq.middleware import Middleware, MiddlewareError

from tasker.brokers.pgmq import PGMQBroker
from tasker.db.errors import database_error, is_transient
from tasker.db.migrate import schema_problem
from tasker.engine.templates import register_template
from tasker.exceptions import (
    DatabaseUnavailableError,
    MigrationError,
    TemplateConflictError,
    WorkflowDefinitionError,
)
from tasker.workflow.definition import registered_workflows

__all__ = [
    "RegistrationUnavailableError",
    "SchemaNotReadyAtBootError",
    "TemplateConflictAtBootError",
    "TemplateRefusedAtBootError",
    "TemplateRegistrar",
]

logger = logging.getLogger(__name__)


class TemplateConflictAtBootError(TemplateConflictError, MiddlewareError):
    """A worker defines a workflow version that is registered with another definition: it does
    not start (Dramatiq lets a middleware error stop the boot)."""


class TemplateRefusedAtBootError(WorkflowDefinitionError, MiddlewareError):
    """PostgreSQL refused to store a template (or the definition broke a rule after it was
    checked): the worker does not start, and ``tasker worker`` does not restart it, since the
    same definition would be refused again."""


class RegistrationUnavailableError(DatabaseUnavailableError, MiddlewareError):
    """The templates could not be registered at boot because PostgreSQL could not be reached:
    the worker does not start (``tasker worker`` starts it again, with backoff)."""


class SchemaNotReadyAtBootError(MigrationError, MiddlewareError):
    """The database lacks migrations this Tasker needs (``tasker db migrate`` has not run yet,
    or not since an upgrade): the worker does not start, and ``tasker worker`` starts it again
    with backoff, so it comes up once the migrations ran (a Kubernetes migrate Job, say)."""


class TemplateRegistrar(Middleware):
    """Stores the template of every workflow defined in this process when a worker boots, so
    clients (which need no handler code) can create tasks from them.

    A worker whose definition of a version differs from the stored one refuses to start
    (:class:`TemplateConflictAtBootError`, see :mod:`tasker.engine.templates`), unless
    ``allow_replace`` (the ``engine.allow_template_replace`` setting).
    """

    def __init__(self, broker: PGMQBroker, *, allow_replace: bool = False) -> None:
        self.pgmq = broker
        self.allow_replace = allow_replace

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        flows = registered_workflows()
        try:
            with self.pgmq.pool.connection() as conn:
                problem = schema_problem(conn)
                if problem:
                    raise SchemaNotReadyAtBootError(
                        f"The {problem.removeprefix('the ')}. This worker process starts again "
                        "with backoff until they are applied."
                    )
                for flow in flows:
                    register_template(conn, flow, allow_replace=self.allow_replace)
                autovacuum = conn.execute("SHOW autovacuum").fetchone()
        except SchemaNotReadyAtBootError as exc:
            logger.critical("%s", exc)
            raise
        except TemplateConflictError as exc:
            logger.critical("%s", exc)
            raise TemplateConflictAtBootError(str(exc)) from exc
        except WorkflowDefinitionError as exc:
            logger.critical("Could not register the workflow templates: %s", exc)
            raise TemplateRefusedAtBootError(str(exc)) from exc
        except psycopg.Error as exc:
            error = database_error(exc, url=self.pgmq.url, timeout_s=self.pgmq.timeout_s)
            logger.critical("Could not register the workflow templates: %s", error)
            if is_transient(exc):
                raise RegistrationUnavailableError(str(error)) from exc
            raise TemplateRefusedAtBootError(str(error)) from exc
        logger.info("Registered %d workflow template(s)", len(flows))
        if autovacuum and autovacuum[0] == "off":
            logger.warning(
                "autovacuum is off on this PostgreSQL: queue tables bloat and the planner's "
                "statistics go stale, which makes every step slower. Turn it on, or run "
                "VACUUM ANALYZE on the pgmq and tasker schemas regularly."
            )

"""``tasker.Client``: start workflows and wait for them, from any process.

A client needs no handler code: it creates tasks from the templates that workers registered. It
writes the task, its steps and the first messages in one transaction, optionally the caller's::

    client = tasker.Client()                       # settings decide the database
    handle = client.submit("fulfillment", "process_order", context={"order_id": 7})
    status = client.wait(handle.task_uuid, timeout=30)

    with psycopg.connect(url) as conn:             # inside your own transaction
        client.submit("fulfillment", "process_order", context=..., connection=conn)

Every error a client raises is a :class:`~tasker.exceptions.TaskerError`: an unreachable database
is a :class:`~tasker.exceptions.DatabaseUnavailableError` after at most ``database.timeout_s``
seconds (5 by default), naming the setting to check.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from tasker.brokers.pgmq import PGMQBroker
from tasker.db.connection import DEFAULT_TIMEOUT_S, last_connect_error
from tasker.db.errors import database_error, is_transient
from tasker.engine.status import TaskStatus, task_status
from tasker.engine.tasks import TaskHandle, TaskRequest, create_task
from tasker.engine.templates import register_template
from tasker.exceptions import TaskTimeoutError
from tasker.runtime.sender import BrokerSender
from tasker.settings import Settings, load_settings
from tasker.workflow.definition import Workflow
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES

__all__ = ["Client"]

logger = logging.getLogger(__name__)


class Client:
    """Submit workflows, read their status, wait for them.

    ``Client()`` reads settings (``TASKER_ENV``, ``TASKER_DATABASE__URL``); ``Client(url=...)``
    uses that database with default broker settings; ``timeout_s`` bounds connecting and waiting
    for a pooled connection (default: ``database.timeout_s``, 5 s); contexts over
    ``max_payload_bytes`` bytes of JSON are refused (default: ``engine.max_payload_bytes``, 1 MiB).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        broker: PGMQBroker | None = None,
        timeout_s: float | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        if broker is None:
            if url is None and settings is None:
                settings = load_settings()
            broker = _broker(url, settings, timeout_s)
        self.broker = broker
        if max_payload_bytes is None:
            max_payload_bytes = (
                settings.engine.max_payload_bytes if settings is not None else MAX_PAYLOAD_BYTES
            )
        self.max_payload_bytes = max_payload_bytes
        #: What :meth:`register` does with a changed definition of a registered version when
        #: not told: the ``engine.allow_template_replace`` setting (off without settings).
        self.allow_template_replace = (
            settings.engine.allow_template_replace if settings is not None else False
        )
        self._sender = BrokerSender(broker)

    def submit(
        self,
        namespace: str,
        name: str,
        context: dict[str, Any] | None = None,
        *,
        version: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        connection: Any = None,
        **fields: Any,
    ) -> TaskHandle:
        """Create a task from the registered template (latest version unless ``version``).

        A duplicate (same identity) returns the existing task with ``created=False``. With
        ``connection``, the task starts inside the caller's transaction: rolled back, nothing
        exists and nothing was sent. Without it, a submit that loses its connection is repeated
        once on a fresh one; the repeat finds the task if the first try created it.
        """
        request = TaskRequest(
            namespace=namespace,
            name=name,
            context=context if context is not None else {},
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            **fields,
        )
        nonce = str(uuid.uuid4())
        if connection is not None:
            with self._translated():
                return create_task(
                    connection,
                    self._sender,
                    request,
                    nonce=nonce,
                    max_context_bytes=self.max_payload_bytes,
                )
        for attempt in (1, 2):
            try:
                with self.broker.pool.connection() as conn:
                    return create_task(
                        conn,
                        self._sender,
                        request,
                        nonce=nonce,
                        max_context_bytes=self.max_payload_bytes,
                    )
            except psycopg.Error as exc:
                if attempt == 2 or isinstance(exc, PoolTimeout) or not is_transient(exc):
                    raise self._error(exc) from exc
                logger.warning("Submit lost its connection (%s); repeating it once", exc)
                self.broker.pool.drain()  # the repeat gets a new session, not a dying one
        raise AssertionError("unreachable")

    def status(self, task_uuid: str) -> TaskStatus:
        """The task's state with every step."""
        with self._connection() as conn:
            return task_status(conn, task_uuid)

    def wait(self, task_uuid: str, timeout: float = 30.0, *, interval: float = 0.05) -> TaskStatus:
        """Block until the task is final (complete, error, ...); raise TaskTimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(task_uuid)
            if status.finished:
                return status
            if time.monotonic() >= deadline:
                steps = ", ".join(f"{s.name} {s.state}" for s in status.steps)
                raise TaskTimeoutError(
                    f"Task {task_uuid} is still {status.state} after {timeout}s (steps: {steps}); "
                    f"are workers running for namespace {status.namespace!r} "
                    "(tasker worker MODULES)?"
                )
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            interval = min(interval * 1.5, 0.5)

    def register(self, flow: Workflow, *, allow_replace: bool | None = None) -> None:
        """Register ``flow``'s template (workers do this at boot; useful in scripts and tests).

        Raises :class:`~tasker.exceptions.TemplateConflictError` when that version is registered
        with another definition, unless ``allow_replace`` (default:
        :attr:`allow_template_replace`, the ``engine.allow_template_replace`` setting).
        """
        if allow_replace is None:
            allow_replace = self.allow_template_replace
        with self._connection() as conn:
            register_template(conn, flow, allow_replace=allow_replace)

    def close(self) -> None:
        """Close the client's connections."""
        self.broker.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._translated(), self.broker.pool.connection() as conn:
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, PoolTimeout):  # say why no connection came, when the pool knows
            exc = last_connect_error(self.broker.pool) or exc
        return database_error(exc, url=self.broker.url, timeout_s=self.broker.timeout_s)


def _broker(url: str | None, settings: Settings | None, timeout_s: float | None) -> PGMQBroker:
    if settings is None:
        assert url is not None
        return PGMQBroker(url=url, timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    from tasker.runtime.broker import broker_from_settings

    return broker_from_settings(settings, timeout_s=timeout_s)

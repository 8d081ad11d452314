"""``tasker.Client``: start workflows and wait for them, from any process.

A client needs no handler code: it creates tasks from the templates that workers registered. It
writes the task, its steps and the first messages in one transaction, optionally the caller's::

    client = tasker.Client()                       # settings decide the database
    handle = client.submit("fulfillment", "process_order", context={"order_id": 7})
    status = client.wait(handle.task_uuid, timeout=30)   # woken by the task's own commit

    client.list_tasks(namespace="fulfillment", state="blocked_by_failures")
    client.complete_step(task_uuid, "charge", result={"charge_id": "manual-1"},
                         by="ops@example.com", reason="charged by phone")
    client.cancel(task_uuid, by="ops@example.com", reason="customer withdrew")

    with psycopg.connect(url) as conn:             # inside your own transaction
        client.submit("fulfillment", "process_order", context=..., connection=conn)

Every error a client raises is a :class:`~tasker.exceptions.TaskerError`: an unreachable database
is a :class:`~tasker.exceptions.DatabaseUnavailableError` after at most ``database.timeout_s``
seconds (5 by default), naming the setting to check.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from tasker.brokers.pgmq import PGMQBroker
from tasker.db.connection import DEFAULT_TIMEOUT_S, connect, last_connect_error
from tasker.db.errors import database_error, is_transient
from tasker.engine.actions import (
    ActionResult,
    AuditEntry,
    CancelResult,
    ManualAction,
    act_on_step,
    cancel_task,
    step_audit,
    task_audit,
)
from tasker.engine.listing import TaskPage, list_tasks
from tasker.engine.status import StepStatus, TaskStatus, task_status
from tasker.engine.tasks import TaskHandle, TaskRequest, create_task
from tasker.engine.templates import (
    Template,
    TemplateSummary,
    find_template,
    list_templates,
    register_template,
)
from tasker.exceptions import ConfigurationError, PayloadError, TaskTimeoutError
from tasker.metrics import worker_metrics
from tasker.runtime.sender import BrokerSender
from tasker.settings import Settings, load_settings
from tasker.workflow.definition import Workflow
from tasker.workflow.payloads import MAX_PAYLOAD_BYTES

__all__ = ["SETTLED_CHANNEL", "Client"]

#: The NOTIFY channel on which every task entering a final state or ``blocked_by_failures``
#: is announced, with the payload ``<task_uuid> <state>`` (migration 0005).
SETTLED_CHANNEL = "tasker_task_settled"
#: Seconds between two reads of a waited-for task when no notification comes (a safety net:
#: the notification wakes the wait first).
DEFAULT_POLL_INTERVAL_S = 1.0

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
        once on a fresh one; the repeat finds the task if the first try created it. A created
        task counts in ``tasker_tasks_created_total`` (:mod:`tasker.metrics`) when this returns.
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
                return _counted(
                    create_task(
                        connection,
                        self._sender,
                        request,
                        nonce=nonce,
                        max_context_bytes=self.max_payload_bytes,
                    )
                )
        for attempt in (1, 2):
            try:
                with self.broker.pool.connection() as conn:
                    handle = create_task(
                        conn,
                        self._sender,
                        request,
                        nonce=nonce,
                        max_context_bytes=self.max_payload_bytes,
                    )
                return _counted(handle)
            except psycopg.Error as exc:
                if attempt == 2 or isinstance(exc, PoolTimeout) or not is_transient(exc):
                    raise self._error(exc) from exc
                logger.warning("Submit lost its connection (%s); repeating it once", exc)
                self.broker.pool.drain()  # the repeat gets a new session, not a dying one
        raise AssertionError("unreachable")

    def status(self, task_uuid: str) -> TaskStatus:
        """The task's state with every step."""
        with self.connection() as conn:
            return task_status(conn, task_uuid)

    def wait(
        self,
        task_uuid: str,
        timeout: float = 30.0,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: Callable[[TaskStatus], None] | None = None,
    ) -> TaskStatus:
        """Block until the task is settled: final (complete, error, cancelled, resolved_manually)
        or waiting in ``blocked_by_failures`` for a person (``status.blocked`` says which).

        The wait is woken by the NOTIFY of the task's own commit (channel
        :data:`SETTLED_CHANNEL`), so it returns within milliseconds of it; the task is also read
        every ``poll_interval`` seconds in case a notification is lost (or when no listening
        connection can be opened). ``on_progress`` is called with every status read.

        Raises :class:`~tasker.exceptions.TaskTimeoutError` after ``timeout`` seconds,
        :class:`~tasker.exceptions.TaskNotFoundError` for an unknown task.
        """
        for name, value in (("timeout", timeout), ("poll_interval", poll_interval)):
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigurationError(
                    f"{name} must be a positive, finite number of seconds, not {value!r}."
                )
        deadline = time.monotonic() + timeout
        task = str(task_uuid)
        with self._settled_listener() as listener:
            while True:
                status = self.status(task)
                if on_progress is not None:
                    on_progress(status)
                if status.settled:
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TaskTimeoutError(_still_running(status, timeout))
                _await_settled(listener, task, min(poll_interval, left))

    def list_tasks(
        self,
        *,
        namespace: str | None = None,
        workflow: str | None = None,
        version: str | None = None,
        state: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        initiator: str | None = None,
        source_system: str | None = None,
        tags: Mapping[str, Any] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        namespaces: Sequence[str] | None = None,
    ) -> TaskPage:
        """Tasks matching every filter given, newest first, ``limit`` at a time; pass the page's
        ``next_cursor`` as ``cursor`` for the next page (keyset pagination: stable while tasks
        are added). ``namespaces`` limits the listing to those namespaces (a caller's scope, as
        the HTTP API's scoped keys have). See :func:`tasker.engine.listing.list_tasks` for the
        filters' rules; a bad filter raises :class:`~tasker.exceptions.InvalidFilterError`."""
        with self.connection() as conn:
            return list_tasks(
                conn,
                namespace=namespace,
                workflow=workflow,
                version=version,
                state=state,
                since=since,
                until=until,
                initiator=initiator,
                source_system=source_system,
                tags=dict(tags) if tags is not None else None,
                limit=limit,
                cursor=cursor,
                namespaces=namespaces,
            )

    def steps(self, task_uuid: str) -> tuple[StepStatus, ...]:
        """The task's steps in dependency order (a step after every step it depends on)."""
        return self.status(task_uuid).steps

    def cancel(self, task_uuid: str, *, by: str, reason: str = "") -> CancelResult:
        """Cancel the task now: no step starts after this returns, its queued messages are
        removed, steps running now may finish and are recorded (the task stays cancelled).

        Raises :class:`~tasker.exceptions.TaskNotFoundError` and
        :class:`~tasker.exceptions.ActionNotAllowedError` (the task is final already).
        """
        with self.connection() as conn:
            return cancel_task(conn, self._sender, task_uuid, by=by, reason=reason)

    def retry_step(self, task_uuid: str, step: str, *, by: str, reason: str = "") -> ActionResult:
        """Run a failed step (in ``error``) again with its attempts back to 0; a task waiting
        in ``blocked_by_failures`` or given up in ``error`` runs again. ``step``: its name or id.

        Raises :class:`~tasker.exceptions.TaskNotFoundError`,
        :class:`~tasker.exceptions.StepNotFoundError`,
        :class:`~tasker.exceptions.ActionNotAllowedError`.
        """
        return self._act(task_uuid, step, ManualAction.RETRY, by=by, reason=reason)

    def resolve_step(self, task_uuid: str, step: str, *, by: str, reason: str = "") -> ActionResult:
        """Mark the step ``resolved_manually``: its dependents proceed without its result.
        Same errors as :meth:`retry_step`."""
        return self._act(task_uuid, step, ManualAction.RESOLVE, by=by, reason=reason)

    def complete_step(
        self, task_uuid: str, step: str, *, result: Any, by: str, reason: str = ""
    ) -> ActionResult:
        """Mark the step ``complete`` with ``result``, which its dependents read as the step's
        result (checked by the payload rules, at most ``max_payload_bytes``). Same errors as
        :meth:`retry_step`, and :class:`~tasker.exceptions.PayloadError`."""
        return self._act(
            task_uuid, step, ManualAction.COMPLETE, by=by, reason=reason, result=result
        )

    def audit(self, task_uuid: str, step: str | None = None) -> list[AuditEntry]:
        """The transitions of the task (or of its ``step``, by name or id), newest first, with
        who did what and why for an operator's actions."""
        with self.connection() as conn:
            if step is None:
                return task_audit(conn, task_uuid)
            return step_audit(conn, task_uuid, step)

    def _act(
        self,
        task_uuid: str,
        step: str,
        action: ManualAction,
        *,
        by: str,
        reason: str,
        result: Any = None,
    ) -> ActionResult:
        with self.connection() as conn:
            return act_on_step(
                conn,
                self._sender,
                task_uuid,
                step,
                action,
                by=by,
                reason=reason,
                result=result,
                max_result_bytes=self.max_payload_bytes,
            )

    @contextmanager
    def _settled_listener(self) -> Iterator[psycopg.Connection[Any] | None]:
        """A connection listening on :data:`SETTLED_CHANNEL` (its own: LISTEN is per session),
        or None when none can be opened (the wait then polls)."""
        url = self.broker.url
        if url is None:  # a caller's pool without a URL: poll
            yield None
            return
        try:
            conn = connect(url, connect_timeout=max(round(self.broker.timeout_s), 1))
            conn.execute(f"LISTEN {SETTLED_CHANNEL}")
        except psycopg.Error as exc:
            logger.info("Waiting by polling: no listening connection (%s)", exc)
            yield None
            return
        try:
            yield conn
        finally:
            conn.close()

    def register(self, flow: Workflow, *, allow_replace: bool | None = None) -> None:
        """Register ``flow``'s template (workers do this at boot; useful in scripts and tests).

        Raises :class:`~tasker.exceptions.TemplateConflictError` when that version is registered
        with another definition, unless ``allow_replace`` (default:
        :attr:`allow_template_replace`, the ``engine.allow_template_replace`` setting).
        """
        if allow_replace is None:
            allow_replace = self.allow_template_replace
        with self.connection() as conn:
            register_template(conn, flow, allow_replace=allow_replace)

    def templates(self, namespace: str | None = None) -> list[TemplateSummary]:
        """The registered template versions (of ``namespace`` only, if given)."""
        with self.connection() as conn:
            return list_templates(conn, namespace)

    def template(self, namespace: str, name: str, version: str | None = None) -> Template:
        """A registered template with its whole definition (``configuration``): ``version``,
        else the latest release. Raises :class:`~tasker.exceptions.TemplateNotFoundError`."""
        with self.connection() as conn:
            return find_template(conn, namespace, name, version)

    def close(self) -> None:
        """Close the client's connections."""
        self.broker.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the client's pool, for the engine's functions
        (:mod:`tasker.engine`); errors inside are Tasker's (an unreachable database raises
        :class:`~tasker.exceptions.DatabaseUnavailableError`), the transaction is committed at
        the end of the block unless it raises."""
        with self._translated(), self.broker.pool.connection() as conn:
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        except UnicodeEncodeError as exc:  # text PostgreSQL cannot store, in any argument
            raise PayloadError(
                f"An argument holds text that is not valid Unicode ({exc.reason} at position "
                f"{exc.start}: a lone surrogate, e.g. from bytes that were not UTF-8); pass "
                "valid text."
            ) from None

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, psycopg.DataError):  # a value of the caller's that cannot be stored
            return _data_error(exc)
        if isinstance(exc, PoolTimeout):  # say why no connection came, when the pool knows
            exc = last_connect_error(self.broker.pool) or exc
        return database_error(exc, url=self.broker.url, timeout_s=self.broker.timeout_s)


def _data_error(exc: psycopg.DataError) -> PayloadError:
    """A value PostgreSQL refused (SQLSTATE class 22, or text holding NUL, which psycopg
    refuses before sending) as the caller's error, naming the fix."""
    if "NUL" in str(exc) and exc.sqlstate is None:
        return PayloadError(
            "An argument holds a NUL character (\\x00), which PostgreSQL text cannot store; "
            "remove it."
        )
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return PayloadError(f"PostgreSQL refused a value of an argument ({reason}); fix that value.")


def _broker(url: str | None, settings: Settings | None, timeout_s: float | None) -> PGMQBroker:
    if settings is None:
        assert url is not None
        return PGMQBroker(url=url, timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    from tasker.runtime.broker import broker_from_settings

    return broker_from_settings(settings, timeout_s=timeout_s)


def _await_settled(listener: psycopg.Connection[Any] | None, task: str, seconds: float) -> None:
    """Return when ``task`` is announced settled on ``listener``, or after ``seconds``."""
    if listener is None:
        time.sleep(min(seconds, 0.5))
        return
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            for notify in listener.notifies(timeout=left):
                if notify.payload.split(" ", 1)[0] == task:
                    return
    except psycopg.Error as exc:  # the listener died: the caller's next read decides
        logger.info("The wait's listening connection failed (%s); polling", exc)
        time.sleep(max(min(deadline - time.monotonic(), 0.5), 0))


def _still_running(status: TaskStatus, timeout: float) -> str:
    """Why a wait timed out, and what to check."""
    steps = ", ".join(f"{s.name} {s.state}" for s in status.steps)
    running = [s for s in status.steps if s.state == "in_progress"]
    if running:
        hint = "its steps are running: wait longer (a larger timeout)"
    else:
        hint = f"are workers running for namespace {status.namespace!r} (tasker worker MODULES)?"
    still = f"Task {status.task_uuid} is still {status.state} after {timeout:g}s"
    return f"{still} (steps: {steps}); {hint}"


def _counted(handle: TaskHandle) -> TaskHandle:
    """``handle``, counted in ``tasker_tasks_created_total`` when it is a new task."""
    if handle.created:
        worker_metrics().tasks_created.labels(handle.namespace, handle.name).inc()
    return handle

"""A worker process's readiness, as its ``tasker worker`` supervisor sees it.

The supervisor answers ``/health/ready`` for the whole pod: ready only when every worker process
has booted, none is stopping, and none reports a reason not to be ready
(:mod:`tasker.runtime.pod_health`). Each worker process tells it through one small JSON file,
``<pid>.json`` in the private directory the supervisor names (``--state-dir``), rewritten
atomically (a temporary file renamed over it) whenever something changes: booted, stopping, or
a reason set with :func:`set_process_ready`. The supervisor reads the files when it is asked, and
deletes a process's file once the process has exited. Nothing is written per message.

:func:`set_process_ready` is for code in a worker process that knows it cannot work right now (a
circuit breaker open on the database): ``set_process_ready(False, "database breaker open",
source="database")``, then ``set_process_ready(True, source="database")`` when it can. Each
``source`` keeps its own flag; the process is ready when none is down. Outside a supervised
worker process (``dramatiq tasker.actors``, tests) the flags are only kept in memory
(:func:`process_status`).

This module imports nothing else of Tasker, so any layer may call it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessStatus",
    "configure",
    "process_status",
    "read_statuses",
    "report_booted",
    "report_stopping",
    "set_process_ready",
    "status_path",
]

logger = logging.getLogger(__name__)

_SUFFIX = ".json"


@dataclass(frozen=True)
class ProcessStatus:
    """What one worker process reported last."""

    pid: int
    worker_id: int = 0
    booted: bool = False
    stopping: bool = False
    #: Why it is not ready, by source (empty: nothing holds it back).
    not_ready: Mapping[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Booted, not stopping, and no source holds it back."""
        return self.booted and not self.stopping and not self.not_ready

    def to_json(self) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "worker_id": self.worker_id,
                "booted": self.booted,
                "stopping": self.stopping,
                "not_ready": dict(self.not_ready),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ProcessStatus:
        data: dict[str, Any] = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            worker_id=int(data.get("worker_id", 0)),
            booted=bool(data.get("booted", False)),
            stopping=bool(data.get("stopping", False)),
            not_ready={str(k): str(v) for k, v in dict(data.get("not_ready", {})).items()},
        )


class _Reporter:
    """This process's status and where to write it (None: nowhere)."""

    lock = threading.Lock()
    status = ProcessStatus(pid=0)  # the pid is set by configure()
    directory: Path | None = None


def status_path(directory: str | Path, pid: int) -> Path:
    """The status file of process ``pid`` in ``directory``."""
    return Path(directory) / f"{pid}{_SUFFIX}"


def configure(directory: str | Path | None, worker_id: int = 0) -> None:
    """Write this process's status to ``directory`` from now on (the worker process calls this
    first thing, with its supervisor's ``--state-dir``); None keeps it in memory."""
    with _Reporter.lock:
        _Reporter.directory = None if directory is None else Path(directory)
        _Reporter.status = replace(_Reporter.status, pid=os.getpid(), worker_id=worker_id)
        _write(_Reporter.status)


def report_booted() -> None:
    """The worker process has booted: it consumes its queues."""
    _update(lambda status: replace(status, booted=True))


def report_stopping() -> None:
    """The worker process is stopping (a stop request): it is no longer ready."""
    _update(lambda status: replace(status, stopping=True))


def set_process_ready(ok: bool, reason: str = "", *, source: str = "default") -> None:
    """Hold this worker process's readiness back (``ok=False``, saying why) or release it
    (``ok=True``), for ``source``; the pod is not ready while any process is held back."""

    def change(status: ProcessStatus) -> ProcessStatus:
        not_ready = dict(status.not_ready)
        if ok:
            not_ready.pop(source, None)
        else:
            not_ready[source] = reason or "not ready"
        return replace(status, not_ready=not_ready)

    _update(change)


def process_status() -> ProcessStatus:
    """This process's status as last reported."""
    status = _Reporter.status
    return status if status.pid else replace(status, pid=os.getpid())


def read_statuses(directory: str | Path) -> dict[int, ProcessStatus]:
    """Every status file in ``directory``, by pid (unreadable files are skipped)."""
    found: dict[int, ProcessStatus] = {}
    try:
        paths = list(Path(directory).glob(f"*{_SUFFIX}"))
    except OSError:
        return found
    for path in paths:
        try:
            status = ProcessStatus.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile (the process exited), or not ours
        found[status.pid] = status
    return found


def _update(change: Callable[[ProcessStatus], ProcessStatus]) -> None:
    """Apply ``change`` to this process's status; write the file if that changed it."""
    with _Reporter.lock:
        status = change(_Reporter.status)
        if status != _Reporter.status:
            _Reporter.status = status
            _write(status)


def _write(status: ProcessStatus) -> None:
    """Replace the status file atomically (under the lock); a failure is logged, never raised:
    the supervisor then sees the process as not ready, which is the safe side."""
    directory = _Reporter.directory
    if directory is None:
        return
    path = status_path(directory, status.pid)
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text(status.to_json())
        os.replace(temporary, path)
    except OSError:
        logger.exception("Could not write this process's readiness to %s", path)

"""``/health/ready`` and ``/health/live`` of a ``tasker worker`` supervisor: the pod's probes.

**Ready** (200) only when all of these hold, else 503 with the reasons in the JSON body:

* the supervisor is not stopping (from the first SIGTERM or SIGINT on) and did not give up;
* every worker process slot has a running process that has booted (it reported so in its
  readiness file, :mod:`tasker.readiness`), is not stopping (no SIGTERM sent to it, no reload)
  and reports no reason not to be ready (:func:`tasker.readiness.set_process_ready`);
* every pluggable check of the supervisor passes: a callable returning ``(ok, reason)``
  (:class:`~tasker.runtime.supervisor.Supervisor`'s ``checks``; one that raises fails).

So the pod answers 503 while it starts, while a crashed process waits for its restart, during a
graceful stop and a reload, and while a worker process holds its readiness back.

**Live** (200) while the supervisor's loop turns: its last turn is less than
:data:`LIVE_STALE_S` old.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasker.readiness import ProcessStatus

__all__ = ["LIVE_STALE_S", "Check", "ChildView", "PodHealth", "process_state"]

logger = logging.getLogger(__name__)

#: A supervisor loop that has not turned for this long is not live (it turns every 0.2 s).
LIVE_STALE_S = 30.0
#: ``() -> (ok, reason)``: a readiness check of the supervisor.
Check = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class ChildView:
    """What the supervisor knows of one worker process slot, at one instant."""

    index: int
    pid: int | None  # None: no process runs in the slot (it waits for its restart)
    stopping: bool  # a SIGTERM was sent to it, or it is being reloaded


@dataclass(frozen=True)
class PodHealth:
    """The readiness of the pod, with each slot's state and the reasons it is not ready."""

    ready: bool
    states: Mapping[int, str]  # slot -> one of pod_metrics.PROCESS_STATES
    reasons: Sequence[str]
    processes: Sequence[Mapping[str, Any]]

    @classmethod
    def evaluate(
        cls,
        children: Sequence[ChildView],
        statuses: Mapping[int, ProcessStatus],
        *,
        stopping: str | None,
        checks: Sequence[Check] = (),
    ) -> PodHealth:
        """``stopping``: why the whole supervisor is not ready (None: it serves)."""
        reasons = [stopping] if stopping else []
        states: dict[int, str] = {}
        processes = []
        for child in children:
            status = statuses.get(child.pid) if child.pid is not None else None
            state = process_state(child, status)
            states[child.index] = state
            entry: dict[str, Any] = {"index": child.index, "pid": child.pid, "state": state}
            if status is not None and status.not_ready:
                entry["not_ready"] = dict(status.not_ready)
            processes.append(entry)
            if state != "ready":
                reasons.append(_reason(child, state, status))
        reasons += _failed_checks(checks)
        return cls(not reasons, states, reasons, processes)

    def body(self) -> dict[str, Any]:
        """The JSON body of ``/health/ready`` (beside ``status``)."""
        return {"reasons": list(self.reasons), "processes": list(self.processes)}


def process_state(child: ChildView, status: ProcessStatus | None) -> str:
    """``down``, ``stopping``, ``starting``, ``not_ready`` or ``ready``."""
    if child.pid is None:
        return "down"
    if child.stopping or (status is not None and status.stopping):
        return "stopping"
    if status is None or not status.booted:
        return "starting"
    return "ready" if status.ready else "not_ready"


def _reason(child: ChildView, state: str, status: ProcessStatus | None) -> str:
    """``worker process 1 (pid 4121) not_ready: database breaker open``."""
    pid = f" (pid {child.pid})" if child.pid is not None else ""
    why = "; ".join(status.not_ready.values()) if status is not None else ""
    return f"worker process {child.index}{pid} {state}" + (f": {why}" if why else "")


def _failed_checks(checks: Sequence[Check]) -> list[str]:
    failed = []
    for check in checks:
        try:
            ok, reason = check()
        except Exception as exc:
            logger.exception("Readiness check %r failed", check)
            ok, reason = False, f"{getattr(check, '__name__', 'a check')} raised {exc!r}"
        if not ok:
            failed.append(reason or getattr(check, "__name__", "a check failed"))
    return failed

"""Shared by the workflow benchmark's driver and its worker modules: the workloads and the ledger.

The workloads (the same DAG for every system):

* ``w1``: linear chain ``s1 -> s2 -> s3 -> s4``;
* ``w2``: diamond ``a -> (b1, b2) -> d``;
* ``w3``: fan-out/fan-in ``root -> (m00 .. m49) -> join``.

The ledger is a plain file. Every step handler appends one line
``<workflow id> <step> <t_start_ns> <t_end_ns>\\n`` with a single ``write()`` on an ``O_APPEND``
descriptor (lines of concurrent writers never interleave). The path comes from the environment
variable ``BENCH_LEDGER``; without it, handlers write nothing.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LEDGER_ENV = "BENCH_LEDGER"
FANOUT_WIDTH = 50


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    #: step name -> its parents, in a topological order
    parents: dict[str, tuple[str, ...]]
    final: str

    @property
    def steps(self) -> int:
        return len(self.parents)

    @property
    def root(self) -> str:
        return next(iter(self.parents))


def _chain() -> Workload:
    parents = {"s1": (), "s2": ("s1",), "s3": ("s2",), "s4": ("s3",)}
    return Workload("w1", "linear chain of 4", parents, "s4")


def _diamond() -> Workload:
    parents = {"a": (), "b1": ("a",), "b2": ("a",), "d": ("b1", "b2")}
    return Workload("w2", "diamond 1->2->1", parents, "d")


def fanout_names(width: int = FANOUT_WIDTH) -> list[str]:
    return [f"m{i:02d}" for i in range(width)]


def _fanout() -> Workload:
    middle = fanout_names()
    parents: dict[str, tuple[str, ...]] = {"root": ()}
    parents.update({name: ("root",) for name in middle})
    parents["join"] = tuple(middle)
    return Workload("w3", f"fan-out 1->{FANOUT_WIDTH}->1", parents, "join")


WORKLOADS: dict[str, Workload] = {w.key: w for w in (_chain(), _diamond(), _fanout())}


class Ledger:
    """Appends ledger lines; the descriptor is opened lazily once per process (after a fork)."""

    def __init__(self, env_var: str = LEDGER_ENV) -> None:
        self.env_var = env_var
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def _descriptor(self) -> int | None:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        path = os.environ.get(self.env_var)
        if not path:
            return None
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            return self._fd

    def record(self, workflow_id: str, step: str, start_ns: int, end_ns: int) -> None:
        fd = self._descriptor()
        if fd is not None:
            os.write(fd, f"{workflow_id} {step} {start_ns} {end_ns}\n".encode())


LEDGER = Ledger()


def noop_step(workflow_id: str, step: str) -> None:
    """The benchmark's step body: no work, one ledger line."""
    start_ns = time.time_ns()
    LEDGER.record(workflow_id, step, start_ns, time.time_ns())


# -- reading ----------------------------------------------------------------------------------

Timings = dict[str, dict[str, tuple[int, int]]]  # workflow id -> step -> (start_ns, end_ns)


def read_ledger(path: Path) -> tuple[Timings, int]:
    """The ledger as ``{workflow: {step: (start, end)}}`` and the number of duplicate lines."""
    timings: Timings = {}
    duplicates = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return timings, 0
    for line in data.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        workflow, step = parts[0].decode(), parts[1].decode()
        steps = timings.setdefault(workflow, {})
        if step in steps:
            duplicates += 1
            continue
        steps[step] = (int(parts[2]), int(parts[3]))
    return timings, duplicates


def handoffs_ms(workload: Workload, timings: Timings, workflows: Iterable[str]) -> list[float]:
    """``start(child) - max(end(parents))`` for every step with parents, in milliseconds."""
    values: list[float] = []
    for workflow in workflows:
        steps = timings.get(workflow, {})
        for step, parents in workload.parents.items():
            if not parents or step not in steps or any(p not in steps for p in parents):
                continue
            ready = max(steps[p][1] for p in parents)
            values.append((steps[step][0] - ready) / 1e6)
    return values


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    if len(values) == 1:
        v = values[0]
        return {"n": 1, "min": v, "p50": v, "p95": v, "p99": v, "max": v, "mean": v}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "min": min(values),
        "p50": cuts[49],
        "p95": cuts[94],
        "p99": cuts[98],
        "max": max(values),
        "mean": statistics.fmean(values),
    }

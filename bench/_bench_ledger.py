"""Shared by the workflow benchmark's driver and its worker modules: the workloads and the ledger.

The workloads (the same DAG for every system):

* ``w1``: linear chain ``s1 -> s2 -> s3 -> s4``;
* ``w2``: diamond ``a -> (b1, b2) -> d``;
* ``w3``: fan-out/fan-in ``root -> (m00 .. m49) -> join``;
* ``w4`` (wide): fan-out/fan-in ``root -> (w0000 .. w0999) -> join``, 1,002 steps;
* ``w5`` (long): linear chain ``c001 -> c002 -> ... -> c200``.

``w4`` and ``w5`` are the "wide and long" shapes: the driver runs them only when asked
(``--shapes`` or ``--workloads``).

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
from typing import Any

LEDGER_ENV = "BENCH_LEDGER"
FANOUT_WIDTH = 50
WIDE_WIDTH = 1000
LONG_LENGTH = 200


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


def chain_parents(names: list[str]) -> dict[str, tuple[str, ...]]:
    """``names`` as a linear chain: each step depends on the one before it."""
    return {name: (names[index - 1],) if index else () for index, name in enumerate(names)}


def is_chain(workload: Workload) -> bool:
    """Whether every step but the first has exactly its predecessor as its only parent."""
    names = list(workload.parents)
    return workload.parents == chain_parents(names)


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


def wide_names(width: int = WIDE_WIDTH) -> list[str]:
    return [f"w{i:04d}" for i in range(width)]


def _wide() -> Workload:
    middle = wide_names()
    parents: dict[str, tuple[str, ...]] = {"root": ()}
    parents.update({name: ("root",) for name in middle})
    parents["join"] = tuple(middle)
    return Workload("w4", f"wide fan-out 1->{WIDE_WIDTH:,}->1", parents, "join")


def _long() -> Workload:
    names = [f"c{i:03d}" for i in range(1, LONG_LENGTH + 1)]
    return Workload("w5", f"long chain of {LONG_LENGTH}", chain_parents(names), names[-1])


WORKLOADS: dict[str, Workload] = {
    w.key: w for w in (_chain(), _diamond(), _fanout(), _wide(), _long())
}
#: the wide and long shapes, run only when asked for
SHAPES = ("w4", "w5")


def fan(workload: Workload) -> tuple[list[str], str] | None:
    """``(middle steps, join)`` of a fan-out/fan-in ``root -> middle -> join``; None otherwise."""
    middle = [name for name, parents in workload.parents.items() if parents == (workload.root,)]
    if not middle or workload.parents.get(workload.final) != tuple(middle):
        return None
    return middle, workload.final


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


def fan_in_ms(workload: Workload, timings: Timings, workflows: Iterable[str]) -> dict[str, Any]:
    """Per workflow of a fan-out/fan-in, from step timings (milliseconds):

    * ``fan_out``: first middle start - root end;
    * ``middle_spread``: last middle end - first middle end (how long the siblings took to
      finish, one after another or together);
    * ``fan_in``: join start - last middle end (the handoff of the join);
    * ``root_end_to_join_start``: the whole middle section.
    """
    shape = fan(workload)
    out: dict[str, list[float]] = {
        "fan_out": [],
        "middle_spread": [],
        "fan_in": [],
        "root_end_to_join_start": [],
    }
    if shape is None:
        return {}
    middle, join = shape
    for workflow in workflows:
        steps = timings.get(workflow, {})
        if workload.root not in steps or join not in steps or any(m not in steps for m in middle):
            continue
        root_end = steps[workload.root][1]
        first_start = min(steps[m][0] for m in middle)
        first_end = min(steps[m][1] for m in middle)
        last_end = max(steps[m][1] for m in middle)
        join_start = steps[join][0]
        out["fan_out"].append((first_start - root_end) / 1e6)
        out["middle_spread"].append((last_end - first_end) / 1e6)
        out["fan_in"].append((join_start - last_end) / 1e6)
        out["root_end_to_join_start"].append((join_start - root_end) / 1e6)
    return {name: percentiles(values) for name, values in out.items()}


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


def announce_ready() -> None:
    """Tell the driver this worker process is ready: one line appended to the file named by
    ``BENCH_READY_FILE`` (nothing without it)."""
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"ready {os.getpid()}\n".encode())
        finally:
            os.close(fd)

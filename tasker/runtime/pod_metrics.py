"""The files a ``tasker worker`` supervisor shares with its worker processes, and its ``/metrics``.

**The private directory** (:class:`PodFiles`), one per supervisor run:

1. The supervisor makes it when it starts (``tempfile.mkdtemp``: mode 0700, under ``$TMPDIR``)
   with two sub-directories: ``metrics/``, the ``PROMETHEUS_MULTIPROC_DIR`` of every worker
   process (set in the child's environment, so before its interpreter imports
   prometheus-client), and ``processes/``, their readiness files (``--state-dir``,
   :mod:`tasker.readiness`). A ``PROMETHEUS_MULTIPROC_DIR`` inherited from the supervisor's own
   environment is replaced: files of another program must never mix with these.
2. When a worker process has exited, :meth:`PodFiles.process_exited`:
   ``multiprocess.mark_process_dead`` drops its live gauges (``tasker_steps_in_progress``,
   ``tasker_circuit_breaker_state``), its counters and histograms are folded into one archive
   file per type, so the pod's totals survive restarts and a crash-looping process adds no
   files, and its readiness file is deleted.
3. When the supervisor exits, the directory is deleted. A supervisor killed by SIGKILL leaves
   it behind (in Kubernetes, in the pod's ``/tmp`` emptyDir, which goes with the pod).

**/metrics** is one registry per pod: :class:`WorkerProcessMetrics` (every worker process's
metrics, summed by prometheus-client's ``MultiProcessCollector.merge`` under the lock the folding
takes, so a scrape never sees a process twice or not at all) and :class:`SupervisorMetrics`
(readiness, processes by state, restarts).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, cast

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from tasker.coordinator.metrics import METRIC_NAMES as COORDINATOR_METRICS
from tasker.readiness import status_path

__all__ = [
    "MULTIPROC_VAR",
    "PROCESS_STATES",
    "PodFiles",
    "SupervisorMetrics",
    "WorkerProcessMetrics",
    "pod_registry",
]

logger = logging.getLogger(__name__)

MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: Metric types whose files of exited processes are folded into one archive per type (gauges
#: are per process: ``mark_process_dead`` drops the live ones).
_FOLDED = ("counter", "histogram", "summary")
#: The states ``tasker_worker_processes{state}`` counts worker processes in.
PROCESS_STATES = ("starting", "ready", "not_ready", "stopping", "down")


class _MmapFile(Protocol):
    def write_value(self, key: str, value: float, timestamp: float) -> None: ...

    def close(self) -> None: ...


# prometheus-client's multiprocess helpers, typed (the library leaves them unannotated).
_merge = cast(Callable[[list[str], bool], Iterable[Metric]], MultiProcessCollector.merge)
_mark_process_dead = cast(Callable[[int, str], None], mark_process_dead)
_open_mmap = cast(Callable[[str], _MmapFile], MmapedDict)


class PodFiles:
    """The supervisor's private directory (see the module doc); :meth:`close` deletes it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tasker-worker-"))
        self.metrics_dir = self.root / "metrics"
        self.state_dir = self.root / "processes"
        self.metrics_dir.mkdir()
        self.state_dir.mkdir()
        #: Held while reading the metric files and while folding an exited process's.
        self.lock = threading.Lock()

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` for a worker process: prometheus-client's multiprocess mode in this
        directory."""
        return {**env, MULTIPROC_VAR: str(self.metrics_dir)}

    def process_exited(self, pid: int) -> None:
        """Bookkeeping for a worker process that has exited (reaped)."""
        status_path(self.state_dir, pid).unlink(missing_ok=True)
        with self.lock:
            _mark_process_dead(pid, str(self.metrics_dir))
            for kind in _FOLDED:
                try:
                    self._fold(kind, pid)
                except Exception:  # the counts stay in the process's own file: still exported
                    logger.exception("Could not fold the %s metrics of pid %d", kind, pid)

    def _fold(self, kind: str, pid: int) -> None:
        """Merge ``<kind>_<pid>.db`` into ``<kind>_archive.db`` and delete it."""
        dead = self.metrics_dir / f"{kind}_{pid}.db"
        if not dead.exists():
            return
        archive = self.metrics_dir / f"{kind}_archive.db"
        files = [str(dead)] + ([str(archive)] if archive.exists() else [])
        merged = _merge(files, False)  # accumulate=False: the file format, buckets not summed
        temporary = self.metrics_dir / f"{kind}_archive.db.tmp"  # not *.db: never collected
        temporary.unlink(missing_ok=True)
        out = _open_mmap(str(temporary))
        try:
            for metric in merged:
                for sample in metric.samples:
                    labels = sample.labels
                    key = mmap_key(
                        metric.name,
                        sample.name,
                        list(labels),
                        list(labels.values()),
                        metric.documentation,
                    )
                    out.write_value(key, sample.value, 0.0)
        finally:
            out.close()
        os.replace(temporary, archive)
        dead.unlink()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class WorkerProcessMetrics:
    """The worker processes' metrics, summed from their files (a Prometheus collector)."""

    def __init__(self, files: PodFiles) -> None:
        self.files = files

    def describe(self) -> list[Metric]:
        return []  # nothing to check for clashes at registration; collect() reads the files

    def collect(self) -> Iterator[Metric]:
        with self.files.lock:
            paths = [str(path) for path in self.files.metrics_dir.glob("*.db")]
            merged = list(_merge(paths, True))
        for metric in merged:
            if metric.name not in COORDINATOR_METRICS:
                yield metric


class SupervisorMetrics:
    """The supervisor's own metrics, computed when scraped (a Prometheus collector).

    ``snapshot()`` returns ``(ready, processes by state, restarts so far)``.
    """

    def __init__(self, snapshot: Callable[[], tuple[bool, Mapping[str, int], int]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ready, by_state, restarts = self.snapshot()
        yield GaugeMetricFamily(
            "tasker_worker_ready",
            "1 when /health/ready answers 200: every worker process booted and ready",
            value=1 if ready else 0,
        )
        processes = GaugeMetricFamily(
            "tasker_worker_processes", "Worker processes of this pod, by state", labels=["state"]
        )
        for state in PROCESS_STATES:
            processes.add_metric([state], by_state.get(state, 0))
        yield processes
        yield CounterMetricFamily(
            "tasker_worker_process_restarts",
            "Worker processes restarted after they exited unasked",
            value=restarts,
        )


def pod_registry(files: PodFiles, supervisor: SupervisorMetrics) -> CollectorRegistry:
    """The registry the supervisor serves on ``/metrics``."""
    registry = CollectorRegistry()
    registry.register(WorkerProcessMetrics(files))
    registry.register(supervisor)
    return registry

"""DBOS Transact, the durable peer of the workflow benchmark, run by
``python -m bench._bench_peers_dbos`` (``--processes`` times: one DBOS executor per process).

DBOS keeps its workflow state in a PostgreSQL "system database": here the same PostgreSQL as
Tasker, in its own database, which the driver drops, re-creates and gives DBOS's schema with
``DBOS.migrate`` (the workers launch with ``run_migrations=False``, so they never race to
migrate it).

How the workloads map onto DBOS, with the pattern of DBOS's queue tutorial (a workflow enqueues
its tasks on a queue, then waits on their handles):

* every DAG node is one run of ``wfb_step(workflow_id, step)``, a workflow whose body is the
  no-op (one ledger line), enqueued on the queue ``wfbench_dbos_steps`` with
  ``DBOS.enqueue_workflow``. Whichever process dequeues it runs it: that is what spreads the steps
  over the processes. (DBOS runs anything it dequeues as a workflow; an enqueued ``@DBOS.step``
  is wrapped in a temporary workflow that also checkpoints the step's output, one more write for
  the same no-op.) Its completion is checkpointed in ``dbos.workflow_status``;
* one workflow, ``wfb_workflow(workload, workflow_id)``, runs a whole DAG, level by level (W1:
  ``s1``, ``s2``, ``s3``, ``s4``; W2: ``a``, ``b1``+``b2``, ``d``; W3: ``root``, the 50 ``mNN``,
  ``join``; every node's parents are on the level before it): it enqueues a level's nodes, waits
  on every handle (``get_result``, the fan-in) and then enqueues the next level. It returns after
  the final node;
* the driver submits with ``DBOSClient.enqueue`` (DBOS's way to start a workflow from outside
  the application: it inserts the ``ENQUEUED`` row, nothing runs in the driver) on the queue
  ``wfbench_dbos_workflows``, with the benchmark's workflow id as the DBOS workflow id. Every
  process dequeues from that queue too.

Settings that differ from DBOS's defaults:

* both queues are polled every 10 ms (``polling_interval_sec=0.01``; default 1 s), so that DBOS
  is not paced by its polling interval. DBOS has no notification for a finished workflow either:
  a workflow waiting on a handle polls the child's ``workflow_status`` row, every
  ``polling_interval_sec`` of ``get_result`` (default 1 s), also set to 10 ms here;
* ``wfbench_dbos_steps`` runs at most ``BENCH_DBOS_THREADS`` (the benchmark's ``--threads``)
  nodes at once per process (``worker_concurrency``): the same 2 x 4 slots as every other system.
  ``wfbench_dbos_workflows`` has ``worker_concurrency`` ``BENCH_DBOS_WORKFLOW_CONCURRENCY``
  (default: the same number). A running ``wfb_workflow`` holds an executor thread and polls while
  it waits, so this bounds the DAGs in progress per process, not the step slots; on this 2-core
  machine 4 did at least as well as 8 and 32 (fewer threads polling);
* each process has its own ``executor_id`` (``wfbench-1``, ``wfbench-2``), which DBOS requires
  for ``worker_concurrency`` and recovery; the application version is pinned (``wfbench``), and
  the log level is WARNING.

Environment: ``BENCH_DBOS_URL`` (the system database), ``BENCH_DBOS_EXECUTOR``,
``BENCH_DBOS_THREADS``, ``BENCH_DBOS_WORKFLOW_CONCURRENCY``, ``BENCH_LEDGER``, and
``BENCH_READY_FILE``: once both queues' worker threads run, the process appends a line to it. A
worker exits on SIGTERM or SIGINT (``DBOS.destroy``), or by itself after
``BENCH_DBOS_MAX_SECONDS`` (default 3 h).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from dbos import DBOS, DBOSClient

from bench._bench_ledger import WORKLOADS, Workload, announce_ready, noop_step

APP_NAME = "tasker-wfbench"
APP_VERSION = "wfbench"
WORKFLOW_QUEUE = "wfbench_dbos_workflows"
STEP_QUEUE = "wfbench_dbos_steps"
WORKFLOW_NAME = "wfb_workflow"
POLLING_INTERVAL_S = 0.01  # both queues' polling and the handles' get_result polling
DEFAULT_MAX_SECONDS = 3 * 3600.0


def levels(workload: Workload) -> list[list[str]]:
    """The DAG's steps by depth: a step is on the level after its deepest parent."""
    depth: dict[str, int] = {}
    for step, parents in workload.parents.items():  # topological order
        depth[step] = 1 + max((depth[p] for p in parents), default=-1)
    result: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for step, level in depth.items():
        result[level].append(step)
    return result


LEVELS = {key: levels(spec) for key, spec in WORKLOADS.items()}


@DBOS.workflow(name="wfb_step")
def wfb_step(workflow_id: str, step: str) -> None:
    noop_step(workflow_id, step)


@DBOS.workflow(name=WORKFLOW_NAME)
def wfb_workflow(workload: str, workflow_id: str) -> None:
    for level in LEVELS[workload]:
        handles = [DBOS.enqueue_workflow(STEP_QUEUE, wfb_step, workflow_id, s) for s in level]
        for handle in handles:
            handle.get_result(polling_interval_sec=POLLING_INTERVAL_S)


# -- the driver's side ----------------------------------------------------------------------------


def create_schema(url: str) -> None:
    """DBOS's system tables in the (new, empty) database at ``url``."""
    DBOS.migrate(url)


class Submitter:
    """Enqueues workflows from outside the application, as a DBOS client does."""

    def __init__(self, url: str) -> None:
        self.client = DBOSClient(system_database_url=url, application_name=APP_NAME)

    def submit(self, workload: str, workflow_id: str) -> None:
        self.client.enqueue(
            {
                "workflow_name": WORKFLOW_NAME,
                "queue_name": WORKFLOW_QUEUE,
                "workflow_id": workflow_id,
                "app_version": APP_VERSION,
            },
            workload,
            workflow_id,
        )

    def close(self) -> None:
        self.client.destroy()


# -- the worker process ---------------------------------------------------------------------------


def _queue_threads_running(names: tuple[str, ...]) -> bool:
    running = {t.name for t in threading.enumerate() if t.is_alive()}
    return all(f"queue-worker-{name}" in running for name in names)


def main() -> int:
    url = os.environ["BENCH_DBOS_URL"]
    threads = int(os.environ.get("BENCH_DBOS_THREADS", "4"))
    workflow_concurrency = int(os.environ.get("BENCH_DBOS_WORKFLOW_CONCURRENCY") or threads)
    max_seconds = float(os.environ.get("BENCH_DBOS_MAX_SECONDS", str(DEFAULT_MAX_SECONDS)))
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    DBOS(
        config={
            "name": APP_NAME,
            "system_database_url": url,
            "executor_id": os.environ.get("BENCH_DBOS_EXECUTOR", f"wfbench-{os.getpid()}"),
            "application_version": APP_VERSION,
            "run_migrations": False,
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    try:
        for name, concurrency in ((WORKFLOW_QUEUE, workflow_concurrency), (STEP_QUEUE, threads)):
            DBOS.register_queue(
                name,
                worker_concurrency=concurrency,
                polling_interval_sec=POLLING_INTERVAL_S,
                on_conflict="always_update",
            )
        # DBOS's queue manager looks for newly registered queues once a second.
        deadline = time.monotonic() + 30
        while not _queue_threads_running((WORKFLOW_QUEUE, STEP_QUEUE)):
            if time.monotonic() >= deadline or stop.wait(0.05):
                print("DBOS queue threads did not start", file=sys.stderr, flush=True)
                return 1
        announce_ready()
        stop.wait(max_seconds)
        return 0
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A workflow still waiting on a handle holds a non-daemon executor thread that the
    # interpreter would join at exit; the benchmark only stops workers that are idle.
    os._exit(code)

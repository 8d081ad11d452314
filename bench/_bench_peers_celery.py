"""Celery on Redis, the peer of the workflow benchmark, run by
``celery -A bench._bench_peers_celery worker --pool threads --concurrency 4`` (twice).

How the workloads map onto Celery's canvas:

* ``w1`` and ``w5`` (chains of 4 and 200): ``chain`` of one immutable signature of ``wfb_step``
  per step;
* ``w2``, ``w3`` and ``w4`` (fan-outs of 2, 50 and 1,000): ``chain(root, chord(children,
  join))``. A chord needs a result backend, so results go to Redis too, which is Celery's
  default behaviour for every task.

Settings that differ from Celery's defaults: ``task_acks_late=True``,
``task_reject_on_worker_lost=True``, a visibility timeout of one hour (longer than any run), and
the key prefix ``tasker-wfbench-celery:`` on broker and result keys, so the driver can delete
exactly its own keys. Everything uses the queue ``wfbench_celery``.

Environment: ``BENCH_REDIS_URL``, ``BENCH_LEDGER``, and ``BENCH_READY_FILE``. When a worker is
ready, it appends a line to the ready file. Celery logs its "ready" line only at INFO, and at INFO
it also logs two lines per task, so the workers run at the default WARNING level instead.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain, chord
from celery.signals import worker_ready

from bench._bench_ledger import WORKLOADS, announce_ready, is_chain, noop_step

QUEUE = "wfbench_celery"
REDIS_PREFIX = "tasker-wfbench-celery:"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_redis_url = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
app = Celery("wfbench", broker=_redis_url, backend=_redis_url)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=QUEUE,
    broker_transport_options={"visibility_timeout": 3600, "global_keyprefix": REDIS_PREFIX},
    result_backend_transport_options={"global_keyprefix": REDIS_PREFIX},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="wfb_step")
def wfb_step(workflow_id: str, step: str) -> None:
    noop_step(workflow_id, step)


@worker_ready.connect
def _announce_ready(sender: Any = None, **_: Any) -> None:
    announce_ready()


def submit(workload: str, workflow_id: str) -> None:
    spec = WORKLOADS[workload]
    if is_chain(spec):
        chain(*(wfb_step.si(workflow_id, s) for s in spec.parents)).apply_async()
        return
    children = [name for name, parents in spec.parents.items() if parents == (spec.root,)]
    header = [wfb_step.si(workflow_id, c) for c in children]
    chain(
        wfb_step.si(workflow_id, spec.root),
        chord(header, wfb_step.si(workflow_id, spec.final)),
    ).apply_async()

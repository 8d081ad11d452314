"""``tasker demo``: the README's demo, end to end with visible progress.

It starts the embedded PostgreSQL (unless a database URL is configured), applies migrations, starts
a worker process for ``examples/order_fulfillment/flows.py``, submits orders through
:class:`tasker.Client`, prints every step as the database records it, and stops the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasker.exceptions import TaskerError
from tasker.workflow.states import StepState

__all__ = ["run_demo"]

_REPO = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 90.0
_LOG = _REPO / ".tasker" / "demo-worker.log"
_SHOWN_STATES = frozenset({StepState.COMPLETE, StepState.WAITING_FOR_RETRY, StepState.ERROR})


def run_demo(*, orders: int = 5) -> int:
    """Run the demo; returns 0 when every order was fulfilled."""
    if not (_REPO / "examples" / "order_fulfillment" / "flows.py").is_file():
        raise TaskerError("`tasker demo` runs from a source checkout (examples/ is missing).")
    from tasker.client import Client
    from tasker.db.migrate import migrate
    from tasker.runtime.broker import broker_from_settings

    broker = broker_from_settings()
    assert broker.url is not None
    print(f"database: {_describe(broker.url)}")
    applied = migrate(broker.url)
    print(f"migrations: {len(applied)} applied, schema up to date")
    client = Client(broker=broker)
    worker = _start_worker(broker.url)
    try:
        _wait_for_template(client)
        handles = [
            client.submit("fulfillment", "process_order", _order(i), idempotency_key=None)
            for i in range(1, orders + 1)
        ]
        print(f"submitted {orders} orders (each: task, steps and first message in one commit)")
        ok = _follow(client, [h.task_uuid for h in handles])
    finally:
        _stop_worker(worker)
        client.close()
    print("demo complete: every order fulfilled" if ok else f"demo FAILED: see {_LOG}")
    return 0 if ok else 1


def _order(i: int) -> dict[str, Any]:
    return {
        "order_id": 1000 + i,
        "customer": {"id": i, "email": f"customer{i}@example.com"},
        "items": [{"sku": f"SKU-{i}", "quantity": i, "price": 9.99}],
        "submitted_at": time.time(),
    }


def _describe(url: str) -> str:
    from tasker.db.errors import mask_url

    embedded = "host=/" in url or "?host=" in url
    return "embedded PostgreSQL (.tasker/pgdata)" if embedded else mask_url(url)


def _start_worker(url: str) -> subprocess.Popen[bytes]:
    _LOG.parent.mkdir(exist_ok=True)
    env = dict(os.environ, TASKER_DATABASE__URL=url, PYTHONPATH=str(_REPO))
    command = [
        sys.executable,
        "-m",
        "tasker.cli",
        "worker",
        "examples.order_fulfillment.flows",
        "--processes",
        "1",
        "--threads",
        "4",
        "--path",
        str(_REPO),
    ]
    print(f"worker: starting (1 process x 4 threads, log in {_LOG.relative_to(_REPO)})")
    with _LOG.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO)


def _wait_for_template(client: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with client.broker.pool.connection() as conn:
            if conn.execute(
                "SELECT 1 FROM tasker.named_tasks WHERE name = 'process_order'"
            ).fetchone():
                print("worker: ready (template fulfillment/process_order registered)")
                return
        time.sleep(0.1)
    raise TaskerError(f"The worker did not register its template within 60 s; see {_LOG}")


def _follow(client: Any, tasks: list[str]) -> bool:
    deadline = time.monotonic() + _TIMEOUT_S
    seen: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        statuses = [client.status(task) for task in tasks]
        changed = []
        for status in statuses:
            for step in status.steps:
                if seen.get((status.task_uuid, step.name)) != step.state:
                    seen[(status.task_uuid, step.name)] = step.state
                    if step.state in _SHOWN_STATES:
                        changed.append((step.finished_at, status.context["order_id"], step))
        for _, order, step in sorted(changed, key=lambda c: (c[0] is None, c[0], c[1])):
            print(f"  order {order}  {step.name:<18} {_describe_step(step)}")
        if all(s.settled for s in statuses):  # final, or blocked by a failed step
            done: int = sum(s.succeeded for s in statuses)
            print(f"{done}/{len(tasks)} orders complete")
            return done == len(tasks)
        time.sleep(0.05)
    return False


def _describe_step(step: Any) -> str:
    if step.state == StepState.WAITING_FOR_RETRY:
        return f"retrying: {step.error['message']} (attempt {step.attempts} failed)"
    if step.state == StepState.ERROR:
        return f"FAILED: {step.error['message']}"
    return f"complete (attempt {step.attempts})"


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    print(f"worker: stopped (exit code {worker.returncode})")

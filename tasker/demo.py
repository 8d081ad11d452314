"""``tasker demo``: the demo of the README, end to end with visible progress.

It starts the embedded PostgreSQL (unless a database URL is configured), applies migrations, starts
a worker process for ``examples/hello/actors.py``, submits orders (row + first message in one
transaction), prints every step as the database records it, and stops the worker cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dramatiq

from tasker.exceptions import TaskerError

__all__ = ["run_demo"]

_REPO = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 90.0


def run_demo(*, orders: int = 20) -> int:
    """Run the demo; returns 0 when every order was shipped."""
    if not (_REPO / "examples" / "hello" / "actors.py").is_file():
        raise TaskerError("`tasker demo` runs from a source checkout (examples/ is missing).")
    from tasker.db.migrate import migrate
    from tasker.runtime.broker import broker_from_settings

    broker = broker_from_settings()
    assert broker.url is not None
    print(f"database: {_describe(broker.url)}")
    applied = migrate(broker.url)
    print(f"migrations: {len(applied)} applied, schema up to date")
    dramatiq.set_broker(broker)
    sys.path.insert(0, str(_REPO))
    from examples.hello import actors

    _reset_orders(broker)
    worker = _start_worker(broker.url)
    try:
        _submit(broker, actors, orders)
        ok = _follow(broker, orders)
    finally:
        _stop_worker(worker)
        broker.close()
    print(
        "demo complete: every order shipped" if ok else "demo FAILED: see .tasker/demo-worker.log"
    )
    return 0 if ok else 1


def _describe(url: str) -> str:
    return "embedded PostgreSQL (.tasker/pgdata)" if "host=/" in url or "?host=" in url else url


def _reset_orders(broker: Any) -> None:
    from examples.hello.actors import SCHEMA

    with broker.pool.connection() as conn:
        conn.execute(SCHEMA)
        conn.execute("TRUNCATE tasker_demo_orders")
    for queue in broker.get_declared_queues():
        broker.flush(queue)


def _start_worker(url: str) -> subprocess.Popen[bytes]:
    log_path = _REPO / ".tasker" / "demo-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    env = dict(os.environ, TASKER_DATABASE__URL=url)
    command = [
        sys.executable,
        "-m",
        "dramatiq",
        "tasker.actors",
        "examples.hello.actors",
        "--processes",
        "1",
        "--threads",
        "4",
        "--path",
        str(_REPO),
    ]
    print("worker: started (1 process x 4 threads, log in .tasker/demo-worker.log)")
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO)


def _submit(broker: Any, actors: Any, orders: int) -> None:
    with broker.pool.connection() as conn, conn.transaction(), broker.use_connection(conn):
        for order_id in range(1, orders + 1):
            conn.execute(
                "INSERT INTO tasker_demo_orders (id, status) VALUES (%s, 'submitted')", (order_id,)
            )
            actors.validate.send(order_id)
    print(f"submitted {orders} orders (rows and messages in one transaction)")


def _follow(broker: Any, orders: int) -> bool:
    deadline = time.monotonic() + _TIMEOUT_S
    last: dict[int, str] = {}
    while time.monotonic() < deadline:
        with broker.pool.connection() as conn:
            rows = conn.execute(
                "SELECT id, status, charge_attempts FROM tasker_demo_orders ORDER BY updated_at"
            ).fetchall()
        for order_id, status, attempts in rows:
            if last.get(order_id) != status:
                last[order_id] = status
                note = f" (payment attempt {attempts})" if status == "charged" else ""
                print(f"  order {order_id:>3} {status}{note}")
        shipped = sum(1 for s in last.values() if s == "shipped")
        if shipped == orders:
            print(f"{shipped}/{orders} orders shipped")
            return True
        time.sleep(0.1)
    return False


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    print(f"worker: stopped (exit code {worker.returncode})")

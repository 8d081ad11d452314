"""Actors for the readiness tests, run as `tasker worker tests.workers.gated`.

* With ``TEST_WORKER_BOOT_GATE=PATH``, importing this module waits (up to two minutes) until
  ``PATH`` exists: a worker process that stays in its boot until the test lets it finish.
* ``hold(key)`` logs its start to ``test_exec_log`` and runs until ``TEST_WORKER_RELEASE``
  names a file that exists (up to two minutes): a long handler the test ends when it wants.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramatiq

from tests.workers import actors
from tests.workers.actors import _log

SCHEMA = actors.SCHEMA
GATE_LIMIT_S = 120.0


def _wait_for_file(variable: str) -> None:
    path = os.environ.get(variable)
    if not path:
        return
    deadline = time.monotonic() + GATE_LIMIT_S
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


_wait_for_file("TEST_WORKER_BOOT_GATE")


@dramatiq.actor(max_retries=0)
def hold(key: str) -> None:
    _log("start", key)
    _wait_for_file("TEST_WORKER_RELEASE")
    _log("end", key)

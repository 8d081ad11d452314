"""What the worker's Prometheus metrics cost per step, without a database: a micro-benchmark.

For every step delivery a worker process does, in memory, what this script repeats: build the
step executor's ``StepReport``, call the ``Metrics`` middleware's ``step_started`` and
``step_finished`` (claims, in-progress gauge, duration and attempts histograms, finished counter)
and count the message (``after_process_message``). Each mode runs in a fresh interpreter, since
prometheus-client picks its value class when it is imported:

* ``none``: the report is built but nobody observes it (the cost left without metrics);
* ``memory``: plain in-memory values (``dramatiq tasker.actors``, tests);
* ``multiprocess``: ``PROMETHEUS_MULTIPROC_DIR`` set, values written to mmap files, as every
  worker process under ``tasker worker`` does.

    python bench/metrics_overhead.py [--steps 100000] [--repeat 5]

Prints one line per mode: the median of ``--repeat`` runs, in microseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "memory", "multiprocess")


def measure(mode: str, steps: int) -> float:
    """Seconds per step in this interpreter (``mode`` as its environment set it up)."""
    from dramatiq.message import Message

    from tasker.engine.results import ResultApplied
    from tasker.engine.sql_outcomes import ClaimOutcome
    from tasker.engine.steps import StepReport, StepRunner
    from tasker.middleware.metrics import Metrics
    from tasker.workflow.states import StepState

    runner = StepRunner("bench", "flow", lambda ctx: None, step="s1")
    applied = ResultApplied(StepState.COMPLETE)
    message = Message(
        queue_name="worker_bench_queue", actor_name="a", args=(), kwargs={}, options={}
    )
    metrics = Metrics() if mode != "none" else None
    started = time.perf_counter()
    for _ in range(steps):
        report = StepReport(runner, ClaimOutcome.CLAIMED, 1, applied, 0.001)
        if metrics is not None:
            metrics.step_started(runner, 1)
            metrics.step_finished(report)
            metrics.after_process_message(None, message)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / steps


def run_mode(mode: str, steps: int) -> float:
    """:func:`measure` in a fresh interpreter, with the environment ``mode`` needs."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="tasker-bench-metrics-") as directory:
        if mode == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        code = (
            "import json, sys; from bench.metrics_overhead import measure; "
            f"print(json.dumps(measure({mode!r}, {steps})))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return float(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for _ in range(args.repeat):  # modes interleaved, so a noisy moment hits all of them
        for mode in MODES:
            results.setdefault(mode, []).append(run_mode(mode, args.steps))
    baseline = statistics.median(results["none"])
    for mode in MODES:
        median = statistics.median(results[mode])
        extra = median - baseline
        print(
            f"{mode:13s} {median * 1e6:7.2f} us/step"
            + (f"   metrics: +{extra * 1e6:.2f} us/step" if mode != "none" else "")
        )


if __name__ == "__main__":
    main()

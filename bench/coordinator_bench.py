"""Does the coordinator slow the hot path? W1 of ``workflow_bench.py`` with the coordinator
running and not running, interleaved in one run.

Run from the repository root (PostgreSQL on 127.0.0.1)::

    .venv/bin/python bench/coordinator_bench.py                  # 3 repetitions of each
    .venv/bin/python bench/coordinator_bench.py --quick          # smoke: 1 repetition, 40 wf

Each repetition runs Tasker (inline result processing) twice, once with a ``tasker coordinator``
process next to the workers (cycle ``--interval``, 1 s by default: five times the default rate,
so that a short phase sees many cycles) and once without, alternating which goes first (off/on,
on/off, off/on, ...) so that a drift of the machine is shared. Each run has its own fresh
database. Reported: W1 throughput (workflows/s), latency (e2e p50), and CPU per step (workers,
the coordinator included, plus PostgreSQL), and the ratio with/without of their means. The
issue's bar: throughput ratio at least 0.9.

Results: a table on stdout and ``bench/results/coordinator_<timestamp>.json``. This is a
benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import workflow_bench as wb  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"


class CoordinatedTasker(wb.TaskerSystem):
    """Tasker with inline result processing, with or without a coordinator process."""

    def __init__(self, coordinator: bool, interval: float, repetition: int, *rest: Any) -> None:
        super().__init__("inline", *rest)
        self.coordinator = coordinator
        self.interval = interval
        variant = "on" if coordinator else "off"
        self.key = f"tasker-coordinator-{variant}-{repetition}"
        self.ledger = self.workdir / f"{self.key}.ledger"
        self.ledger.write_bytes(b"")
        base = urlsplit(self.args.database_url).path.lstrip("/") or "tasker_wfbench"
        self.url = wb.with_database(self.args.database_url, f"{base}_coord_{variant}")
        cycle = f"every {interval:.1f} s" if coordinator else "off"
        self.description += f"; coordinator {cycle}"

    def start_workers(self) -> None:
        super().start_workers()
        if not self.coordinator:
            return
        env = wb.clean_env() | {
            "TASKER_DATABASE__URL": self.url,
            "TASKER_ENV": "production",
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            sys.executable,
            "-m",
            "tasker.cli",
            "coordinator",
            "--interval",
            str(self.interval),
            "--port",
            str(_free_port()),
        ]
        coordinator = wb.Worker("coordinator", command, env, self.logdir / f"{self.key}.log")
        coordinator.start()
        self.workers.append(coordinator)

    def ready(self) -> bool:
        if not super().ready():
            return False
        if not self.coordinator:
            return True
        self.workers[1].check_alive()
        return self.workers[1].log_count("took the lead") >= 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _w1(entry: dict[str, Any]) -> dict[str, float] | None:
    if entry.get("status") != "ok":
        return None
    w1 = entry["workloads"]["w1"]
    return {
        "workflows_per_s": w1["throughput"]["workflows_per_s"],
        "cpu_ms_per_step": w1["throughput"]["cpu_ms_per_step"]["total"],
        "e2e_p50_ms": w1["latency"]["e2e_ms"].get("p50", float("nan")),
    }


def _ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean with the coordinator over mean without, per metric."""
    ratios = {}
    for metric in ("workflows_per_s", "cpu_ms_per_step", "e2e_p50_ms"):
        on = [r["w1"][metric] for r in runs if r["coordinator"] and r["w1"]]
        off = [r["w1"][metric] for r in runs if not r["coordinator"] and r["w1"]]
        if on and off and statistics.mean(off):
            ratios[metric] = round(statistics.mean(on) / statistics.mean(off), 3)
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--interval", type=float, default=1.0, help="coordinator cycle (s)")
    parser.add_argument("--workflows", type=int, default=200, help="W1 throughput workflows")
    parser.add_argument("--latency-workflows", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1 repetition, 40 workflows")
    parser.add_argument("--database-url", default=wb.DEFAULT_DATABASE_URL)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.workflows, args.latency_workflows = 1, 40, 10
    if not 1 <= args.repetitions <= 10:
        parser.error("--repetitions takes 1 to 10")
    bench_args = wb.parse_args(
        [
            "--systems=tasker-inline",
            "--workloads=w1",
            f"--workflows={args.workflows}",
            f"--latency-workflows={args.latency_workflows}",
            f"--database-url={args.database_url}",
            "--stats-delay=0",
            "--no-fsync-probe",
        ]
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    logdir = args.results_dir / f"coordinator_{stamp}_logs"
    logdir.mkdir()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tasker-coordbench-") as tmp:
        for repetition in range(args.repetitions):
            order = (False, True) if repetition % 2 == 0 else (True, False)
            for coordinator in order:
                system = CoordinatedTasker(
                    coordinator, args.interval, repetition, bench_args, logdir, Path(tmp)
                )
                print(f"[{system.key}] {system.description}", flush=True)
                entry = wb.run_system(system, bench_args, stamp)
                runs.append(
                    {
                        "repetition": repetition,
                        "coordinator": coordinator,
                        "status": entry["status"],
                        "error": entry.get("error"),
                        "w1": _w1(entry),
                        "entry": entry,
                    }
                )
    ratios = _ratios(runs)
    header = (
        f"{'rep':>3}  {'coordinator':<11}  {'wf/s':>7}  {'e2e p50 ms':>10}  {'CPU ms/step':>11}"
    )
    lines = [header]
    for run in runs:
        w1 = run["w1"]
        shown = (
            f"{w1['workflows_per_s']:>7.1f}  {w1['e2e_p50_ms']:>10.1f}  "
            f"{w1['cpu_ms_per_step']:>11.2f}"
            if w1
            else f"{run['status']}: {run['error']}"
        )
        variant = "on" if run["coordinator"] else "off"
        lines.append(f"{run['repetition']:>3}  {variant:<11}  {shown}")
    lines.append("")
    lines.append(
        "ratio with/without (means): "
        + ", ".join(f"{metric} {value:.3f}" for metric, value in ratios.items())
    )
    report = {
        "started_at": stamp,
        "argv": sys.argv,
        "config": vars(args) | {"results_dir": str(args.results_dir)},
        "machine": wb.machine(bench_args),
        "runs": runs,
        "ratios": ratios,
        "table": lines,
    }
    path = args.results_dir / f"coordinator_{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nlogs: {logdir}\nresults: {path}")
    return 0 if all(run["status"] == "ok" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compare one workload of bench/workflow_bench.py between two checkouts, interleaved in one run.

Each repetition runs the benchmark once from the baseline checkout and once from the candidate
(alternating which goes first), each with its own code for the workers and the migrations, on the
same machine in the same minutes. The ratio candidate/baseline of the mean steps per second is
what to read: the machine's speed varies between days, not within one run.

    git worktree add /tmp/tasker-base <commit>
    .venv/bin/python bench/compare_commits.py --baseline /tmp/tasker-base --reps 3

Results: a table on stdout and ``bench/results/compare_<timestamp>.json``. A benchmark, not a
test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _commit(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _run_once(checkout: Path, args: argparse.Namespace, results_dir: Path) -> dict[str, Any]:
    """One benchmark run from ``checkout``; its report (the newest JSON it wrote)."""
    before = set(results_dir.glob("workflows_*.json"))
    command = [
        sys.executable,
        str(checkout / "bench" / "workflow_bench.py"),
        "--systems",
        args.system,
        "--workloads",
        args.workload,
        "--workflows",
        str(args.workflows),
        "--latency-workflows",
        str(args.latency_workflows),
        "--no-fsync-probe",
        "--results-dir",
        str(results_dir),
    ]
    completed = subprocess.run(command, check=False, cwd=checkout, capture_output=True, text=True)
    written = sorted(set(results_dir.glob("workflows_*.json")) - before)
    if completed.returncode != 0 or not written:
        raise SystemExit(
            f"the run from {checkout} failed ({completed.returncode}):\n{completed.stdout[-3000:]}"
            f"\n{completed.stderr[-3000:]}"
        )
    report: dict[str, Any] = json.loads(written[-1].read_text())
    return report


def _metrics(report: dict[str, Any], system: str, workload: str) -> dict[str, float]:
    result = report["results"][system]["workloads"][workload]
    throughput = result["throughput"]
    metrics = {"steps_per_s": float(throughput["steps_per_s"])}
    cpu = throughput.get("cpu_ms_per_step") or {}
    if isinstance(cpu.get("total"), (int, float)):
        metrics["cpu_ms_per_step"] = float(cpu["total"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the baseline")
    parser.add_argument(
        "--candidate", type=Path, default=REPO_ROOT, help="checkout of the candidate (this one)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each (default 3)")
    parser.add_argument("--system", default="tasker-inline")
    parser.add_argument("--workload", default="w1")
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--latency-workflows", type=int, default=10)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    sides = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    commits = {name: _commit(path) for name, path in sides.items()}
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = ["baseline", "candidate"] if rep % 2 == 0 else ["candidate", "baseline"]
        for name in order:
            print(f"rep {rep + 1}/{args.reps}: {name} ({commits[name]}) ...", flush=True)
            report = _run_once(sides[name], args, args.results_dir)
            metrics = _metrics(report, args.system, args.workload)
            runs.append({"rep": rep + 1, "side": name, "commit": commits[name], **metrics})
            print(f"  {metrics}", flush=True)
    means = {
        name: statistics.mean(r["steps_per_s"] for r in runs if r["side"] == name) for name in sides
    }
    ratio = means["candidate"] / means["baseline"]
    print()
    print(f"{'rep':>3} {'side':<10} {'commit':<10} {'steps/s':>8}")
    for r in runs:
        print(f"{r['rep']:>3} {r['side']:<10} {r['commit']:<10} {r['steps_per_s']:>8.1f}")
    print(
        f"\n{args.workload} {args.system}: candidate/baseline steps/s = {ratio:.3f} "
        f"(means {means['candidate']:.1f} / {means['baseline']:.1f})"
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"compare_{stamp}.json"
    out.write_text(
        json.dumps(
            {"commits": commits, "runs": runs, "means": means, "ratio": ratio, "argv": sys.argv},
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

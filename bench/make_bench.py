"""``make bench``: the three benchmarks in one run, then the report in docs/benchmarks.md.

    .venv/bin/python bench/make_bench.py                 # what `make bench` runs
    .venv/bin/python bench/make_bench.py --print --skip broker,claim \\
        --workflow-args="--quick --repeat 2 --history-steps 0"

Runs ``broker_throughput.py --repeat 3``, ``claim_latency.py`` and ``workflow_bench.py --repeat 3
--systems tasker-inline,dramatiq,celery,dbos --shapes --history-steps 1000000`` (otherwise their
default flags),
each writing its JSON into ``bench/results/make_bench_<UTC timestamp>/``, then ``report.py`` on
those JSONs. A benchmark that fails (a peer unavailable, a phase timed out) does not stop the
others or the report; the exit code is then 1. Without the workflow JSON there is no report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"

#: name -> (script, default arguments); ``--output`` is added by the driver
RUNS = {
    "broker": ("broker_throughput.py", ["--repeat", "3"]),
    "claim": ("claim_latency.py", []),
    # Tasker inline (the targets) and every peer; decoupled mode is left to a run of
    # workflow_bench.py of its own (it adds a quarter to the run and to the history clone)
    "workflow": (
        "workflow_bench.py",
        [
            "--repeat",
            "3",
            "--systems",
            "tasker-inline,dramatiq,celery,dbos",
            "--shapes",
            "--history-steps",
            "1000000",
        ],
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--results-dir", type=Path, default=BENCH / "results", help="where the run's JSONs go"
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument(
        "--write",
        type=Path,
        default=REPO_ROOT / "docs" / "benchmarks.md",
        help="the document whose make-bench section is replaced (default docs/benchmarks.md)",
    )
    out.add_argument("--print", action="store_true", help="print the report instead")
    parser.add_argument("--skip", default="", help="comma-separated: broker, claim")
    for name in RUNS:
        parser.add_argument(
            f"--{name}-args",
            default="",
            help=f"extra arguments for {RUNS[name][0]}, after the defaults so that they win "
            f'(write --{name}-args="--flag ...")',
        )
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"broker", "claim"}:
        parser.error("--skip takes broker and claim (the report needs the workflow results)")
    return args


def run(name: str, output: Path, extra: str) -> bool:
    script, defaults = RUNS[name]
    command = [
        sys.executable,
        str(BENCH / script),
        *defaults,
        *shlex.split(extra),
        "--output",
        str(output),
    ]
    print(f"[make bench] {shlex.join(command)}", flush=True)
    # each script bounds its own waits (phase, boot, stop and drain timeouts)
    code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
    ok = code == 0 and output.exists()
    if not ok:
        print(f"[make bench] {name}: exit code {code}, results {output.exists()}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    rundir = args.results_dir / f"make_bench_{stamp}"
    rundir.mkdir(parents=True)
    outputs = {name: rundir / f"{name}.json" for name in RUNS}
    failed = [
        name
        for name in RUNS
        if name not in args.skip and not run(name, outputs[name], getattr(args, f"{name}_args"))
    ]
    if not outputs["workflow"].exists():
        print("[make bench] no workflow results: no report", flush=True)
        return 1
    report = [sys.executable, str(BENCH / "report.py"), str(outputs["workflow"])]
    for name in ("broker", "claim"):
        if outputs[name].exists():
            report += [f"--{name}", str(outputs[name])]
    report += ["--print"] if args.print else ["--write", str(args.write)]
    print(f"[make bench] {shlex.join(report)}", flush=True)
    if subprocess.run(report, cwd=REPO_ROOT, check=False).returncode != 0:
        failed.append("report")
    if failed:
        print(f"[make bench] did not complete: {', '.join(failed)} (results in {rundir})")
        return 1
    print(f"[make bench] done; results in {rundir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

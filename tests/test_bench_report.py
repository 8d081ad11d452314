"""bench/report.py renders a `make bench` run into docs/benchmarks.md's marked section: a fake
results JSON, no services."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench import report

INTRO = "# Benchmarks\n\nIntro.\n\n"
X, R = report.X, report.RANGE  # the multiplication sign and the en dash
HISTORY = "\n\n## Broker: an earlier run\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def phase(steps: float, handoff: float, commits: float | None = None) -> dict[str, Any]:
    throughput: dict[str, Any] = {
        "steps_per_s": steps,
        "workflows_per_s": steps / 4,
        "handoff_ms": {"p50": handoff * 3, "p95": handoff * 5},
        "cpu_ms_per_step": {"worker": 1.0, "server": 2.0, "total": 3.0},
        "share_of_cores_used": 0.85,
        "pg_activity": {"samples": 3},
    }
    if commits is not None:
        throughput["db_per_step"] = {"commits": commits, "reliable": True}
    latency = {"e2e_ms": {"p50": 10.0, "p95": 12.0}, "handoff_ms": {"p50": handoff, "p95": 2.0}}
    return {"throughput": throughput, "latency": latency}


def fan_phase() -> dict[str, Any]:
    """A fan-out's phase, with its fan-in and the lock waits (the wide shapes' measures)."""
    run = phase(50, 9.0)
    fan = {name: {"p50": 4.0, "max": 8.0} for name in ("fan_out", "middle_spread", "fan_in")}
    run["throughput"]["fan_in_ms"] = fan
    run["throughput"]["lock_waits"] = {
        "lock_wait_ms_per_step": 0.5,
        "lock_wait_share_of_busy": 0.25,
        "waiting_queries": {"SELECT tasker.complete_step_v3(...)": 7},
    }
    return run


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A workload as ``workflow_bench.py --repeat`` writes it (the summary of a few paths)."""
    paths = {
        "throughput.steps_per_s": ("throughput", "steps_per_s"),
        "latency.handoff_ms.p50": ("latency", "handoff_ms", "p50"),
        "throughput.db_per_step.commits": ("throughput", "db_per_step", "commits"),
    }
    summary = {}
    for name, path in paths.items():
        values = [v for run in runs if (v := report.dig(run, path)) is not None]
        if values:
            summary[name] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "all": values,
            }
    return {**runs[len(runs) // 2], "summary": summary, "repetitions": runs}


def fake_run() -> dict[str, Any]:
    ours = [phase(300, 4.0, 3.1), phase(320, 4.2, 3.3), phase(280, 3.8, 3.2)]
    return {
        "started_at": "2026-12-01T10:00:00+00:00",
        "finished_at": "2026-12-01T10:40:00+00:00",
        "config": {
            "workloads": {"w1": "linear chain of 4", "w9": "a shape from the future"},
            "throughput_workflows": {"w1": 200, "w9": 3},
            "latency_workflows": 30,
            "processes": 2,
            "threads": 4,
            "repeat": 3,
            "history_rounds": 3,
        },
        "machine": {
            "nproc": 2,
            "loadavg_at_start": [1.5, 1.2, 1.0],
            "loadavg_at_end": [2.0, 1.4, 1.1],
            "git": {"head": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
            "postgresql": {"server_version": "15.20", "synchronous_commit": "on", "fsync": "on"},
            "services": {"redis": {"version": "7.0.15", "appendonly": "no"}},
        },
        "results": {
            "tasker-inline": {
                "status": "ok",
                "workloads": {"w1": repeated(ours), "w9": repeated([fan_phase()] * 3)},
            },
            "celery": {
                "status": "ok",
                "workloads": {"w1": repeated([phase(600, 2.0), phase(700, 2.1), phase(650, 2.2)])},
            },
            # a peer the renderer has no label for, written by a single run (no summary)
            "procrastinate": {"status": "ok", "workloads": {"w1": phase(100, 5.0)}},
            "dramatiq": {"status": "unavailable", "error": "RabbitMQ: connection refused"},
        },
        "history": {
            "tasker-inline": {
                "status": "ok",
                "history_steps": 1_000_000,
                "steps_added": 1_000_000,
                "clone_seconds": 160.2,
                "summary": {
                    "steps_per_s": {
                        "empty": {"median": 229.0, "min": 217.0, "max": 323.0},
                        "history": {"median": 228.0, "min": 204.0, "max": 261.0},
                    },
                    "ratio": 228.0 / 229.0,
                    "pair_ratios": [0.63, 1.12],
                },
            }
        },
    }


@pytest.fixture
def results_json(tmp_path: Path) -> Path:
    path = tmp_path / "workflows.json"
    path.write_text(json.dumps(fake_run()))
    return path


def test_renders_what_the_json_holds_known_or_not() -> None:
    text = " ".join(report.render(fake_run()).split())  # prose is wrapped at 100 characters
    assert "`procrastinate`" in text  # an unknown system, under its own key
    assert "| W9 |" in text and "a shape from the future" in text  # an unknown workload
    assert f"| Tasker inline | W1 | 300 (280{R}320) |" in text  # median and spread
    assert "| 3.20 |" in text  # commits per step, the median of 3.1, 3.3, 3.2
    assert "Celery + Redis" in text and f"**0.46{X}**" in text  # 300 / 650
    assert f"0.43{R}0.50{X}" in text  # the repetitions' own ratios: 300/600, 320/700, 280/650
    assert "not met" in text  # against Celery: at least 2x wanted
    assert "unavailable: RabbitMQ: connection refused" in text
    assert (
        "**Fan-outs**" in text and "| Tasker inline | W9 | 4.0 / 8.0 | 4 / 8 | 4.0 / 8.0 |" in text
    )
    assert "| 0.50 | 25% |" in text  # lock wait ms per step, share of the busy backend time
    assert "**History growth**" in text and f"**1.00{X}**" in text and "**met**" in text
    assert "**with uncommitted changes**" in text
    assert "1.50 / 1.20 / 1.00 at the start" in text
    assert "`synchronous_commit=on`" in text and "Redis 7.0.15" in text


def test_write_replaces_only_the_marked_section_and_is_idempotent(
    results_json: Path, tmp_path: Path
) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"{INTRO}{report.BEGIN}\nplaceholder\n{report.END}{HISTORY}")
    assert report.main([str(results_json), "--write", str(doc)]) == 0
    once = doc.read_text()
    assert report.main([str(results_json), "--write", str(doc)]) == 0
    assert doc.read_text() == once
    assert "placeholder" not in once
    assert once.startswith(INTRO + report.BEGIN + "\n## The latest `make bench` run\n")
    assert once.endswith(report.END + HISTORY)
    assert once.count(report.BEGIN) == once.count(report.END) == 1


def test_write_refuses_a_document_without_the_markers(results_json: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(INTRO + HISTORY)
    assert report.main([str(results_json), "--write", str(doc)]) == 2
    assert doc.read_text() == INTRO + HISTORY


def test_print_adds_the_broker_and_claim_runs(
    results_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = tmp_path / "broker.json"
    broker.write_text(
        json.dumps(
            {
                "started_at": "2026-12-01T09:50:00+00:00",
                "machine": {"git": {"head": "fedcba9876543210fedcba9876543210fedcba98"}},
                "config": {"messages": 20000, "repeat": 3, "worker": "dramatiq ..."},
                "results": {
                    "pgmq": {
                        "status": "ok",
                        "throughput_summary": {
                            "msgs_per_s": 3900.0,
                            "msgs_per_s_all": [3800.0, 3900.0, 4000.0],
                        },
                        "latency": {"enqueue_to_start_ms": {"p50": 2.4, "p95": 3.1, "p99": 4.2}},
                    },
                    "redis": {"status": "ok", "throughput_summary": {"msgs_per_s": 3600.0}},
                    "kafka": {"status": "unavailable", "error": "not here"},
                },
            }
        )
    )
    claim = tmp_path / "claim.json"
    claim.write_text(
        json.dumps(
            {
                "delayed": 100000,
                "samples": 100,
                "tasker claim (vt index)": {"p50_ms": 0.45, "p95_ms": 0.74, "max_ms": 2.34},
                "pgmq.read": {"p50_ms": 14.4, "p95_ms": 20.6, "max_ms": 23.3},
            }
        )
    )
    argv = [str(results_json), "--broker", str(broker), "--claim", str(claim), "--print"]
    assert report.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"3,900 (3,800{R}4,000)" in out and f"1.08{X}" in out  # 3900 / 3600
    assert "`kafka`" in out and "unavailable: not here" in out
    assert "Tasker's claim p50 0.45 ms" in out and "**met**" in out
    assert "Run 2026-12-01 09:50:00" in out  # the run began with the broker benchmark
    assert "**The checkout changed during the run**" in out  # its commit is not the workflows'
    assert report.BEGIN not in out


def test_workflow_bench_merges_repetitions_into_medians_and_spread() -> None:
    pytest.importorskip("psutil")  # the bench extra; workflow_bench imports it
    from bench import workflow_bench

    entries = [
        {"status": "ok", "boot_seconds": b, "workloads": {"w1": phase(s, h, c)}}
        for b, s, h, c in ((1.0, 300, 4.0, 3.1), (2.0, 320, 4.2, 3.3), (3.0, 280, 3.8, 3.2))
    ]
    entries.append({"status": "error", "error": "timed out", "workloads": {}})
    merged = workflow_bench.merge_repetitions(entries)
    assert merged["status"] == "error" and merged["error"] == "timed out"
    assert [r["boot_seconds"] for r in merged["repetitions"][:3]] == [1.0, 2.0, 3.0]
    w1 = merged["workloads"]["w1"]
    assert w1["throughput"]["steps_per_s"] == 300  # the median repetition's phase
    assert w1["summary"]["throughput.steps_per_s"] == {
        "median": 300.0,
        "min": 280.0,
        "max": 320.0,
        "all": [300.0, 320.0, 280.0],
    }
    assert w1["summary"]["throughput.db_per_step.commits"]["median"] == 3.2
    assert "throughput.pg_activity.samples" not in w1["summary"]  # diagnostics, not metrics
    waits = workflow_bench.merge_phases([fan_phase()])["summary"]
    assert waits["throughput.lock_waits.lock_wait_share_of_busy"]["median"] == 0.25
    assert not [path for path in waits if "waiting_queries" in path]
    assert len(w1["repetitions"]) == 3
    results = {"tasker-inline": merged}
    assert workflow_bench.metric(results, "tasker-inline", "w1", ("latency", "handoff_ms", "p50"))
    assert (
        report.render({"results": results}).count(f"| Tasker inline | W1 | 300 (280{R}320) |") == 1
    )

"""The report of one ``make bench`` run, in markdown, for docs/benchmarks.md.

    .venv/bin/python bench/report.py bench/results/workflows_X.json \\
        [--broker bench/results/broker_X.json] [--claim bench/results/claim_X.json] \\
        [--write docs/benchmarks.md | --print]

It renders the results JSON of ``bench/workflow_bench.py`` (and, when given, those of
``bench/broker_throughput.py`` and ``bench/claim_latency.py`` from the same run) and replaces the
section of the document between ``<!-- make-bench:begin -->`` and ``<!-- make-bench:end -->``;
the rest of the document is kept as it is. Rendering the same JSONs again gives the same
document. Systems, workloads and sections it has no label for are rendered under their own keys:
the renderer iterates over what the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- make-bench:begin -->"
END = "<!-- make-bench:end -->"
OURS = "tasker-inline"  # the system the ratios and targets are about
X = "\N{MULTIPLICATION SIGN}"
RANGE = "\N{EN DASH}"
EMPTY = '""'  # how an empty setting is shown

SYSTEM_LABELS = {
    "tasker-inline": "Tasker inline",
    "tasker-decoupled": "Tasker decoupled",
    "dramatiq": "Dramatiq + RabbitMQ",
    "celery": "Celery + Redis",
    "dbos": "DBOS Transact",
}
BROKER_LABELS = {
    "pgmq": "Tasker `PGMQBroker`",
    "rabbitmq": "Dramatiq + RabbitMQ (confirms)",
    "redis": "Dramatiq + Redis",
}
MACHINE_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "commit_delay",
    "wal_level",
    "shared_buffers",
    "autovacuum",
    "max_connections",
)


@dataclass(frozen=True)
class Target:
    """A bound a measured number should meet, and the issue that set it."""

    bound: float
    at_least: bool  # True: the value must be >= bound; False: <= bound
    unit: str
    source: str

    def text(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}{self.unit} ({self.source})"

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        met = value >= self.bound if self.at_least else value <= self.bound
        return "**met**" if met else "not met"


#: Tasker inline ÷ peer, by (peer, ratio name); ratio names as in ``ratio_rows``
RATIO_TARGETS = {
    ("dramatiq", "w1 steps/s"): Target(0.6, True, X, "issue 12"),
    ("dramatiq", "w2 steps/s"): Target(1.0, True, X, "issue 12"),
    ("dramatiq", "w3 steps/s"): Target(0.6, True, X, "issue 12"),
    ("dramatiq", "w1 e2e p50"): Target(2.0, False, X, "issue 12"),
    ("celery", "w1 steps/s"): Target(2.0, True, X, "issue 12"),
    ("celery", "w2 steps/s"): Target(2.0, True, X, "issue 12"),
    ("celery", "w3 steps/s"): Target(2.0, True, X, "issue 12"),
    ("dbos", "w1 steps/s"): Target(4.0, True, X, "issue 12"),
    ("dbos", "w2 steps/s"): Target(4.0, True, X, "issue 12"),
    ("dbos", "w3 steps/s"): Target(4.0, True, X, "issue 12"),
}
#: Tasker inline's own numbers: (label, workload, dotted path in a workload's results, target)
ABSOLUTE_TARGETS = (
    (
        "W1 handoff p50, sequential (database clock)",
        "w1",
        "latency.handoff_ms.p50",
        Target(1.0, False, " ms", "issue 12"),
    ),
    (
        "W1 CPU per step (workers + PostgreSQL)",
        "w1",
        "throughput.cpu_ms_per_step.total",
        Target(1.0, False, " ms", "issue 12"),
    ),
    (
        "W1 commits per step",
        "w1",
        "throughput.db_per_step.commits",
        Target(2.0, False, "", "issue 12"),
    ),
)
HISTORY_TARGET = Target(0.9, True, X, "issue 12")
BROKER_THROUGHPUT_TARGET = Target(0.8, True, f"{X} Dramatiq + Redis", "issue 2")
BROKER_LATENCY_TARGET = Target(1.5, False, " ms", "issue 12")
CLAIM_TARGET = Target(1.0, False, " ms", "issue 2")


# -- small helpers ------------------------------------------------------------------------------


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def dig(node: Any, path: Iterable[str]) -> Any:
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def wrap(lines: list[str], width: int = 100) -> list[str]:
    """Prose and bullets wrapped at ``width`` like the rest of the document; tables and
    headings as they are."""
    wrapped: list[str] = []
    for line in lines:
        if line.startswith(("|", "#")) or len(line) <= width:
            wrapped.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        wrapped += textwrap.wrap(
            line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
    return wrapped


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def system_label(key: str) -> str:
    return SYSTEM_LABELS.get(key, f"`{key}`")


def workload_label(key: str) -> str:
    return key.upper()


class Numbers:
    """One workload of one system: medians over the repetitions, their spread, and the numbers
    of a single run (a JSON without ``summary``) as a spread of one."""

    def __init__(self, workload: dict[str, Any]) -> None:
        self.workload = workload
        self.summary = workload.get("summary") or {}

    def values(self, path: str) -> list[float]:
        found = self.summary.get(path)
        if found is not None:
            return [float(v) for v in found["all"]]
        value = dig(self.workload, path.split("."))
        return [float(value)] if isinstance(value, int | float) else []

    def median(self, path: str) -> float | None:
        found = self.summary.get(path)
        if found is not None:
            return float(found["median"])
        values = self.values(path)
        return statistics.median(values) if values else None

    def with_range(self, path: str, digits: int = 0) -> str:
        values = self.values(path)
        text = num(self.median(path), digits)
        if len(values) > 1:
            text += f" ({num(min(values), digits)}{RANGE}{num(max(values), digits)})"
        return text


# -- the run and the machine ----------------------------------------------------------------------


def git_subject(head: str | None) -> str | None:
    if not head:
        return None
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%s", head],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def commit_text(git: dict[str, Any], subject: str | None) -> str:
    head = git.get("head")
    if not head:
        return "an unknown commit"
    text = f"`{head[:12]}`" + (f" “{subject}”" if subject else "")
    if git.get("dirty"):
        text += " **with uncommitted changes**"
    return text


def render_run(
    report: dict[str, Any], subject: str | None, others: Iterable[dict[str, Any]]
) -> list[str]:
    """When the run ran (from the first benchmark's start to the workflows' end) and on what."""
    machine = report.get("machine", {})
    git = machine.get("git") or {}
    starts = [str(d["started_at"]) for d in (report, *others) if d.get("started_at")]
    start = min(starts)[:19].replace("T", " ") if starts else "?"
    end = str(report.get("finished_at", "?"))[:19].replace("T", " ")
    lines = [f"Run {start} {RANGE} {end} UTC, on commit {commit_text(git, subject)}."]
    heads = {git.get("head"), dig(machine, ("git_at_end", "head"))}
    heads |= {dig(d, ("machine", "git", "head")) for d in others}
    if len(heads - {None}) > 1:
        lines.append("**The checkout changed during the run** (see each JSON's `git`).")
    return [" ".join(lines), ""]


def memory(value: Any) -> str:
    """``/proc/meminfo``'s "24684084 kB" in GiB."""
    parts = str(value).split()
    if len(parts) == 2 and parts[0].isdigit() and parts[1] == "kB":
        return f"{int(parts[0]) / 2**20:.1f} GiB"
    return str(value or "?")


def loadavg(value: Any) -> str:
    if not isinstance(value, list | tuple):
        return "-"
    return " / ".join(f"{v:.2f}" for v in value)


def render_machine(report: dict[str, Any], extra: Iterable[dict[str, Any]]) -> list[str]:
    machine = report.get("machine", {})
    lines = ["**Machine state.**", ""]
    lines.append(
        f"- {machine.get('nproc', '?')} cores available ({machine.get('cpu_model') or '?'}), "
        f"{memory(machine.get('mem_total'))} of memory, Linux {machine.get('kernel', '?')}, "
        f"Python {machine.get('python', '?')}."
    )
    lines.append(
        f"- Load average (1 / 5 / 15 min): {loadavg(machine.get('loadavg_at_start'))} at the "
        f"start, {loadavg(machine.get('loadavg_at_end'))} at the end."
    )
    lines += postgres_lines(machine)
    services = dict(machine.get("services") or {})
    for other in extra:  # the broker benchmark records the peers' servers too
        for name in ("rabbitmq", "redis"):
            found = dig(other, ("results", name, "service"))
            if isinstance(found, dict) and name not in services:
                services[name] = found
    for name, info in sorted(services.items()):
        settings = ", ".join(f"{k} `{v or EMPTY}`" for k, v in info.items() if k != "version")
        lines.append(
            f"- {name.capitalize()} {info.get('version', '?')}"
            + (f": {settings}." if settings else ".")
        )
    return [*lines, ""]


def postgres_lines(machine: dict[str, Any]) -> list[str]:
    pg = machine.get("postgresql") or {}
    if not pg:
        return []
    if "error" in pg:
        return [f"- PostgreSQL: not read ({pg['error']})."]
    settings = ", ".join(f"`{k}={pg[k]}`" for k in MACHINE_SETTINGS if k in pg)
    line = f"- PostgreSQL {pg.get('server_version', pg.get('version', '?'))}: {settings}."
    fsync = machine.get("pg_test_fsync") or {}
    if fsync.get("fdatasync_usecs_per_op") is not None:
        line += f" `pg_test_fsync`: fdatasync {fsync['fdatasync_usecs_per_op']} µs per op."
    return [line]


# -- workflows ------------------------------------------------------------------------------------


def workload_keys(results: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The configured workloads first, then any other a system reported, in order."""
    keys = list(config.get("workloads") or {})
    for entry in results.values():
        keys += [k for k in entry.get("workloads") or {} if k not in keys]
    return keys


def render_setup(report: dict[str, Any], keys: list[str]) -> list[str]:
    config = report.get("config", {})
    titles = config.get("workloads") or {}
    workloads = "; ".join(f"{workload_label(k)} {titles.get(k, '')}".strip() for k in keys)
    counts = config.get("throughput_workflows") or {}
    per_phase = ", ".join(f"{workload_label(k)} {counts[k]}" for k in keys if k in counts)
    repeat = config.get("repeat", 1)
    return [
        f"Workloads: {workloads}. Throughput phase: workflows submitted at once ({per_phase}); "
        f"latency phase: {config.get('latency_workflows', '?')} workflows one after another. "
        f"Every system ran {config.get('processes', '?')} processes {X} "
        f"{config.get('threads', '?')} threads. Median of {repeat} repetition(s), interleaved "
        f"across systems (each a fresh database and fresh workers); the spread is min{RANGE}max.",
        "",
    ]


def system_rows(key: str, entry: dict[str, Any], keys: list[str]) -> list[list[str]]:
    label = system_label(key)
    if entry.get("status") == "unavailable" or not entry.get("workloads"):
        return [[label, "-", f"{entry.get('status', '?')}: {entry.get('error', '')}"] + [""] * 6]
    rows = []
    for workload in keys:
        data = entry["workloads"].get(workload)
        if data is None:
            continue
        n = Numbers(data)
        cpu = (
            f"{num(n.median('throughput.cpu_ms_per_step.total'), 2)} "
            f"({num(n.median('throughput.cpu_ms_per_step.worker'), 2)} + "
            f"{num(n.median('throughput.cpu_ms_per_step.server'), 2)})"
        )
        rows.append(
            [
                label,
                workload_label(workload),
                n.with_range("throughput.steps_per_s"),
                num(n.median("throughput.workflows_per_s"), 1),
                num(n.median("latency.e2e_ms.p50"), 1),
                f"{num(n.median('latency.handoff_ms.p50'), 2)} / "
                f"{num(n.median('latency.handoff_ms.p95'), 2)}",
                cpu,
                num(n.median("throughput.db_per_step.commits"), 2),
                num(n.median("throughput.share_of_cores_used"), 2),
            ]
        )
    return rows


def render_systems(report: dict[str, Any], keys: list[str]) -> list[str]:
    results = report.get("results", {})
    header = [
        "system",
        "workload",
        f"steps/s (min{RANGE}max)",
        "wf/s",
        "e2e p50 ms",
        "handoff p50 / p95 ms",
        "CPU ms/step (worker + server)",
        "commits/step",
        "share of cores",
    ]
    rows = [row for key, entry in results.items() for row in system_rows(key, entry, keys)]
    lines = table(header, rows)
    lines += [
        "",
        "steps/s, wf/s, CPU, commits and the share of the cores are from the throughput phase; "
        "e2e and handoffs from the latency phase. Commits per step are "
        "`pg_stat_database.xact_commit` of the system's database, without the driver's queries "
        "and the workers' idle polling (PostgreSQL systems only).",
    ]
    if unreliable_commits(results):
        lines[-1] += " **This run read them less than 10 s after the phases: not reliable.**"
    failed = [k for k, e in results.items() if e.get("status") not in ("ok", "unavailable")]
    for key in failed:
        lines.append(f"\n{system_label(key)} failed: {results[key].get('error', '?')}")
    return [*lines, ""]


def unreliable_commits(results: dict[str, Any]) -> bool:
    return any(
        dig(w, ("throughput", "db_per_step", "reliable")) is False
        for entry in results.values()
        for w in (entry.get("workloads") or {}).values()
    )


def fan_row(key: str, workload: str, n: Numbers) -> list[str]:
    def pair(path: str, digits: int = 1) -> str:
        return f"{num(n.median(path + '.p50'), digits)} / {num(n.median(path + '.max'), digits)}"

    share = n.median("throughput.lock_waits.lock_wait_share_of_busy")
    return [
        system_label(key),
        workload_label(workload),
        pair("throughput.fan_in_ms.fan_out"),
        pair("throughput.fan_in_ms.middle_spread", 0),
        pair("throughput.fan_in_ms.fan_in"),
        num(n.median("latency.fan_in_ms.fan_in.p50"), 1),
        num(n.median("throughput.lock_waits.lock_wait_ms_per_step"), 2),
        "-" if share is None else f"{100 * share:.0f}%",
    ]


def render_fans(report: dict[str, Any], keys: list[str]) -> list[str]:
    """The fan-outs' fan-in and the lock waits, where the phases measured them."""
    rows = []
    for key, entry in report.get("results", {}).items():
        for workload in keys:
            data = (entry.get("workloads") or {}).get(workload)
            tp = (data or {}).get("throughput") or {}
            if tp.get("fan_in_ms") or tp.get("lock_waits"):
                rows.append(fan_row(key, workload, Numbers(data or {})))
    if not rows:
        return []
    header = [
        "system",
        "workload",
        "fan-out p50 / max ms",
        "sibling spread p50 / max ms",
        "fan-in p50 / max ms",
        "fan-in p50 ms, sequential",
        "lock wait ms/step",
        "lock wait, share of busy",
    ]
    return [
        "**Fan-outs** (throughput phase unless 'sequential'): fan-out = first sibling start - "
        "root end, sibling spread = last - first sibling end, fan-in = join start - last sibling "
        "end; lock waits of Tasker's backends on row locks, where the phase sampled them.",
        "",
        *table(header, rows),
        "",
    ]


# -- ratios and targets ---------------------------------------------------------------------------


def ratio_rows(results: dict[str, Any], keys: list[str]) -> list[list[str]]:
    """Tasker inline ÷ each peer: steps/s of every workload both ran, and W1's handoff."""
    ours = results.get(OURS, {}).get("workloads") or {}
    rows = []
    for peer, entry in results.items():
        theirs = entry.get("workloads") or {}
        if peer.startswith("tasker") or not theirs:
            continue
        for workload in keys:
            if workload in ours and workload in theirs:
                name = f"{workload} steps/s"
                rows.append(ratio_row(peer, name, ours[workload], theirs[workload]))
        if "w1" in ours and "w1" in theirs:
            rows.append(ratio_row(peer, "w1 handoff p50", ours["w1"], theirs["w1"]))
            rows.append(ratio_row(peer, "w1 e2e p50", ours["w1"], theirs["w1"]))
    return rows


RATIO_PATHS = {
    "steps/s": ("throughput.steps_per_s", 0),
    "handoff p50": ("latency.handoff_ms.p50", 2),
    "e2e p50": ("latency.e2e_ms.p50", 1),
}


def ratio_row(peer: str, name: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    path, digits = RATIO_PATHS[name.split(" ", 1)[1]]
    a, b = Numbers(ours), Numbers(theirs)
    mine, other = a.median(path), b.median(path)
    ratio = mine / other if mine is not None and other else None
    pairs = [x / y for x, y in zip(a.values(path), b.values(path), strict=False) if y]
    spread = f"{min(pairs):.2f}{RANGE}{max(pairs):.2f}{X}" if len(pairs) > 1 else "-"
    target = RATIO_TARGETS.get((peer, name))
    workload, metric = name.split(" ", 1)
    return [
        f"{workload_label(workload)} {metric}",
        system_label(peer),
        num(mine, digits),
        num(other, digits),
        "-" if ratio is None else f"**{ratio:.2f}{X}**",
        spread,
        target.text() if target else "-",
        target.verdict(ratio) if target else "",
    ]


def render_ratios(report: dict[str, Any], keys: list[str]) -> list[str]:
    rows = ratio_rows(report.get("results", {}), keys)
    if not rows:
        return []
    header = [
        "ratio",
        "peer",
        system_label(OURS),
        "peer",
        "Tasker ÷ peer (medians)",
        "per repetition",
        "target",
        "",
    ]
    return [
        f"**{system_label(OURS)} against each peer** (steps/s: above 1 is faster; handoff: "
        "below 1 is faster; 'per repetition' divides the runs of the same repetition):",
        "",
        *table(header, rows),
        "",
    ]


def render_targets(report: dict[str, Any]) -> list[str]:
    ours = report.get("results", {}).get(OURS, {}).get("workloads") or {}
    rows = []
    for label, workload, path, target in ABSOLUTE_TARGETS:
        if workload not in ours:
            continue
        value = Numbers(ours[workload]).median(path)
        rows.append([label, num(value, 2), target.text(), target.verdict(value)])
    for key, entry in (report.get("history") or {}).items():
        ratio = dig(entry, ("summary", "ratio"))
        label = f"{system_label(key)}: W1 steps/s beside the history ÷ empty"
        rows.append(
            [label, num(ratio, 2) + X, HISTORY_TARGET.text(), HISTORY_TARGET.verdict(ratio)]
        )
    if not rows:
        return []
    return [
        f"**{system_label(OURS)}'s own targets:**",
        "",
        *table(["measure", "measured", "target", ""], rows),
        "",
    ]


# -- history --------------------------------------------------------------------------------------


def history_row(key: str, entry: dict[str, Any]) -> list[str]:
    if entry.get("status") != "ok":
        return [system_label(key), f"{entry.get('status')}: {entry.get('error', '')}"] + [""] * 4
    summary = entry["summary"]

    def rates(db: str) -> str:
        found = summary["steps_per_s"][db]
        return f"{num(found['median'])} ({num(found['min'])}{RANGE}{num(found['max'])})"

    pairs = summary.get("pair_ratios") or []
    return [
        system_label(key),
        rates("empty"),
        rates("history"),
        f"**{summary['ratio']:.2f}{X}**",
        f"{min(pairs):.2f}{RANGE}{max(pairs):.2f}{X}" if pairs else "-",
        HISTORY_TARGET.verdict(summary["ratio"]),
    ]


def render_history(report: dict[str, Any]) -> list[str]:
    history = report.get("history") or {}
    if not history:
        return []
    config = report.get("config", {})
    steps = next((e.get("steps_added") or e.get("history_steps") for e in history.values()), 0)
    clone = ", ".join(
        f"{system_label(k)} {e['clone_seconds']} s"
        for k, e in history.items()
        if "clone_seconds" in e
    )
    header = [
        "system",
        "empty",
        "history",
        "history ÷ empty",
        "adjacent pairs",
        HISTORY_TARGET.text(),
    ]
    return [
        f"**History growth** (`--history-steps`): W1 throughput (steps/s, median of the phases and "
        f"min{RANGE}max) on an empty database and on one holding {num(steps)} finished steps, both "
        f"with their workers running, phases alternated empty, history, history, empty {X} "
        f"{config.get('history_rounds', '?')}" + (f"; cloning took {clone}" if clone else "") + ".",
        "",
        *table(header, [history_row(k, e) for k, e in history.items()]),
        "",
    ]


# -- broker and claim -----------------------------------------------------------------------------


def broker_row(kind: str, entry: dict[str, Any], redis_rate: float | None) -> list[str]:
    label = BROKER_LABELS.get(kind, f"`{kind}`")
    if entry.get("status") != "ok":
        return [label, f"{entry.get('status')}: {entry.get('error', '')}"] + [""] * 4
    summary = entry.get("throughput_summary") or {}
    rate = summary.get("msgs_per_s")
    runs = summary.get("msgs_per_s_all") or []
    spread = f" ({num(min(runs))}{RANGE}{num(max(runs))})" if len(runs) > 1 else ""
    latency = dig(entry, ("latency", "enqueue_to_start_ms")) or {}
    cpu = [
        run["cpu_ms_per_msg_steady"]["server"]
        for run in entry.get("throughput", [])
        if "cpu_ms_per_msg_steady" in run
    ]
    return [
        label,
        num(rate) + spread,
        f"{rate / redis_rate:.2f}{X}" if rate and redis_rate else "-",
        " / ".join(num(latency.get(p), 2) for p in ("p50", "p95", "p99")),
        num(statistics.median(cpu), 3) if cpu else "-",
    ]


def render_broker(broker: dict[str, Any]) -> list[str]:
    results = broker.get("results", {})
    config = broker.get("config", {})
    redis_rate = dig(results, ("redis", "throughput_summary", "msgs_per_s"))
    header = [
        "broker",
        f"msgs/s (min{RANGE}max)",
        "vs Redis",
        "latency p50 / p95 / p99 ms",
        "server CPU ms/msg",
    ]
    rows = [broker_row(kind, entry, redis_rate) for kind, entry in results.items()]
    lines = [
        f"### Broker: `bench/broker_throughput.py --repeat {config.get('repeat', 1)}`",
        "",
        f"{num(config.get('messages'))} no-op messages drained by `{config.get('worker', '?')}`, "
        f"median of {config.get('repeat', 1)} interleaved runs; latency is enqueue-to-start over "
        f"{config.get('latency_samples', '?')} messages sent {config.get('latency_gap_ms', '?')} "
        "ms apart.",
        "",
        *table(header, rows),
        "",
    ]
    pgmq = results.get("pgmq", {})
    rate = dig(pgmq, ("throughput_summary", "msgs_per_s"))
    p50 = dig(pgmq, ("latency", "enqueue_to_start_ms", "p50"))
    if rate is not None:
        ratio = rate / redis_rate if redis_rate else None
        lines.append(
            f"- Throughput ÷ Dramatiq + Redis: {num(ratio, 2)}{X}, target "
            f"{BROKER_THROUGHPUT_TARGET.text()}: {BROKER_THROUGHPUT_TARGET.verdict(ratio)}."
        )
    if p50 is not None:
        lines.append(
            f"- Latency p50: {p50:.2f} ms, target {BROKER_LATENCY_TARGET.text()}: "
            f"{BROKER_LATENCY_TARGET.verdict(p50)}."
        )
    return [*lines, ""]


def render_claim(claim: dict[str, Any]) -> list[str]:
    rows = [
        [f"`{label}`", num(v.get("p50_ms"), 2), num(v.get("p95_ms"), 2), num(v.get("max_ms"), 2)]
        for label, v in claim.items()
        if isinstance(v, dict) and "p50_ms" in v
    ]
    lines = [
        "### Claim behind delayed messages: `bench/claim_latency.py`",
        "",
        f"One ready message claimed behind {num(claim.get('delayed'))} delayed ones, "
        f"{claim.get('samples', '?')} samples (PostgreSQL {claim.get('server_version', '?')}).",
        "",
        *table(["statement", "p50 ms", "p95 ms", "max ms"], rows),
        "",
    ]
    ours = next((v for k, v in claim.items() if k.startswith("tasker") and isinstance(v, dict)), {})
    if "p50_ms" in ours:
        lines.append(
            f"- Tasker's claim p50 {ours['p50_ms']:.2f} ms, target {CLAIM_TARGET.text()}: "
            f"{CLAIM_TARGET.verdict(ours['p50_ms'])}."
        )
    return [*lines, ""]


# -- the section and the document -----------------------------------------------------------------


def render(
    workflows: dict[str, Any],
    broker: dict[str, Any] | None = None,
    claim: dict[str, Any] | None = None,
    subject: str | None = None,
) -> str:
    """The markdown between the markers (without them)."""
    keys = workload_keys(workflows.get("results", {}), workflows.get("config", {}))
    repeat = workflows.get("config", {}).get("repeat", 1)
    lines = [
        "## The latest `make bench` run",
        "",
        "Generated by `bench/report.py` from the results of one `make bench` run; rerun "
        "`make bench` rather than editing it.",
        "",
        *render_run(workflows, subject, [d for d in (broker, claim) if d]),
        *render_machine(workflows, [d for d in (broker,) if d]),
        f"### Workflows: `bench/workflow_bench.py --repeat {repeat}`",
        "",
        *render_setup(workflows, keys),
        *render_systems(workflows, keys),
        *render_fans(workflows, keys),
        *render_ratios(workflows, keys),
        *render_targets(workflows),
        *render_history(workflows),
    ]
    if broker:
        lines += render_broker(broker)
    if claim:
        lines += render_claim(claim)
    return "\n".join(wrap(lines)).rstrip("\n") + "\n"


def replace_section(document: str, section: str) -> str:
    """``document`` with the text between the markers replaced by ``section``."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    return document[: start + len(BEGIN)] + "\n" + section + document[end:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("workflows", type=Path, help="results JSON of bench/workflow_bench.py")
    parser.add_argument("--broker", type=Path, help="results JSON of bench/broker_throughput.py")
    parser.add_argument("--claim", type=Path, help="results JSON of bench/claim_latency.py")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--write", type=Path, help="replace the marked section of this document")
    out.add_argument("--print", action="store_true", help="print the section (the default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workflows = json.loads(args.workflows.read_text())
    broker = json.loads(args.broker.read_text()) if args.broker else None
    claim = json.loads(args.claim.read_text()) if args.claim else None
    section = render(
        workflows, broker, claim, git_subject(dig(workflows, ("machine", "git", "head")))
    )
    if args.write is None:
        print(section, end="")
        return 0
    try:
        document = replace_section(args.write.read_text(), section)
    except ValueError as exc:
        print(
            f"{args.write}: {exc}; add the two markers where the section belongs.", file=sys.stderr
        )
        return 2
    args.write.write_text(document)
    print(f"wrote the make-bench section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

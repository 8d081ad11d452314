"""Workflow benchmark: Tasker (inline and decoupled result processing) against Dramatiq on
RabbitMQ, Celery on Redis and DBOS Transact (durable, on the same PostgreSQL), with the same three
DAGs of no-op steps.

Run from the repository root (every service on 127.0.0.1)::

    .venv/bin/python bench/workflow_bench.py --quick    # smoke: 40/40/5 workflows, 10 sequential
    .venv/bin/python bench/workflow_bench.py            # full: 200/200/10 workflows, 30 sequential
    .venv/bin/python bench/workflow_bench.py --systems tasker-inline,dramatiq
    .venv/bin/python bench/workflow_bench.py --systems tasker-inline --workloads w4,w5

Workloads (``bench/_bench_ledger.py``): W1 a chain of 4 steps, W2 a diamond 1->2->1, W3 a fan-out
1->50->1. For each system the workers are started once; each workload then has a warm-up, a
throughput phase (N workflows submitted back to back, timed until the last one completed) and a
latency phase (workflows one after another). Handoffs (``start(child) - max(end(parents))``) come
from ``tasker.workflow_steps`` for Tasker and from a ledger file the handlers append to for the
peers. CPU comes from ``/proc`` via psutil: the worker process trees plus the servers (PostgreSQL
backends of the benchmark database and PostgreSQL's auxiliary processes; beam.smp; redis-server).
With ``--history-steps N``, each Tasker system then also runs W1 on an empty database and on one
holding N finished steps, in alternating phases, and reports the throughput ratio (target 0.9x).
With ``--repeat N`` every system runs N times, interleaved (repetition 1 of each, then 2 ...),
each time on a fresh database with fresh workers; the tables and ratios use the medians.

The wide and long shapes run only when asked for (``--shapes``, or ``--workloads w4,w5``): W4 a
fan-out 1->1,000->1 and W5 a chain of 200 (2 and 5 throughput workflows, 2 sequential). During a
Tasker W4 throughput phase a sampler reads ``pg_stat_activity`` every 5 ms and reports how long
the backends waited on row locks (by wait event: ``Lock:tuple``, ``Lock:transactionid``) and how
many waited at once. With the fan-in's handoff (join start - last sibling end) and the siblings'
spread, that shows whether the 1,000 completions serialize on one lock.

Results: a table on stdout and ``bench/results/workflows_<timestamp>.json``. This is a benchmark,
not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench._bench_ledger import (  # noqa: E402
    SHAPES,
    WORKLOADS,
    Timings,
    Workload,
    fan,
    fan_in_ms,
    handoffs_ms,
    percentiles,
)
from bench._common import (  # noqa: E402
    BenchError,
    dramatiq_command,
    fmt,
    log_issues,
    rabbitmq_channel,
    redact,
    require_local,
    wait_until,
)

DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
SYSTEMS = ("tasker-inline", "tasker-decoupled", "dramatiq", "celery", "dbos")
DEFAULT_DATABASE_URL = "postgresql://root@127.0.0.1:5432/tasker_wfbench"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
EXTRA_PACKAGES = ("celery", "kombu", "billiard", "psutil", "amqp", "dbos", "sqlalchemy")
TERMINAL_ERROR_STATES = ("error", "blocked_by_failures", "cancelled")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class UnavailableError(RuntimeError):
    """A system cannot run here (service down, package missing)."""


# -- small helpers ------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def ts_ns(value: dt.datetime) -> int:
    """A timestamptz as integer nanoseconds since the epoch, without float rounding."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def cpu_of(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def tree_cpu(roots: list[int]) -> float:
    """utime + stime (seconds) of the live processes under ``roots`` (roots included)."""
    total = 0.0
    for root in roots:
        try:
            parent = psutil.Process(root)
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += cpu_of(proc)
    return total


def named_cpu(names: tuple[str, ...]) -> float:
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in names:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += cpu_of(proc)
    return total


# -- worker subprocesses ------------------------------------------------------------------------


class Worker:
    """One worker command as a subprocess in its own session; stopped by PID only."""

    def __init__(self, label: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.label = label
        self.command = command
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"Worker {self.label} exited early with code {self.proc.returncode}; "
                f"see {self.log}."
            )

    def log_count(self, text: str) -> int:
        try:
            return self.log.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def stop(self, timeout_s: float) -> dict[str, Any]:
        """SIGTERM the main process, wait (bounded), then SIGKILL its family by PID."""
        if self.proc is None:
            return {}
        if self.proc.poll() is not None:
            return {"returncode": self.proc.returncode, "stop_s": 0.0, "killed": False}
        began = time.monotonic()
        try:
            family = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
            for pid in [self.proc.pid, *family]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in family:  # children must not outlive the main process
            if psutil.pid_exists(pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        killed = True
                        os.kill(pid, signal.SIGKILL)
        return {
            "returncode": self.proc.returncode,
            "stop_s": round(time.monotonic() - began, 3),
            "killed": killed,
        }


def clean_env() -> dict[str, str]:
    """The driver's environment without TASKER_*, dramatiq_* and BENCH_* variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TASKER_", "BENCH_")) and not k.lower().startswith("dramatiq_")
    }


# -- ledger tail (peers) ------------------------------------------------------------------------


class LedgerTail:
    """Reads the ledger file incrementally (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.timings: Timings = {}
        self.duplicates = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            steps = self.timings.setdefault(parts[0].decode(), {})
            step = parts[1].decode()
            if step in steps:
                self.duplicates += 1
                continue
            steps[step] = (int(parts[2]), int(parts[3]))


# -- systems ------------------------------------------------------------------------------------


@dataclass
class Collected:
    """What a system recorded for a set of workflows."""

    timings: Timings  # the timings used for handoffs
    completed_ns: dict[str, int]  # workflow id -> completion (what "done" means for the system)
    extra: dict[str, Any] = field(default_factory=dict)
    handler_timings: Timings | None = None  # Tasker: the ledger, for like-for-like handoffs
    last_step_ns: dict[str, int] | None = None  # Tasker: finished_at of the final step


class System:
    """The interface the driver uses; one subclass per system."""

    key = ""
    server_processes: tuple[str, ...] = ()
    description = ""

    def __init__(self, args: argparse.Namespace, logdir: Path, workdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.workdir = workdir
        self.ledger = workdir / f"{self.key}.ledger"
        self.ledger.write_bytes(b"")
        self.workers: list[Worker] = []
        self.info: dict[str, Any] = {}

    # set-up and tear-down
    def setup(self) -> None:
        raise NotImplementedError

    def start_workers(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Driver-side connections."""

    def cleanup(self) -> None:
        """Remove the system's own keys/queues (never anybody else's)."""

    # running
    def submit(self, workload: Workload, workflow_id: str) -> str:
        raise NotImplementedError

    def done(self, workload: Workload, ids: list[str]) -> int:
        raise NotImplementedError

    def collect(self, workload: Workload, ids: list[str]) -> Collected:
        raise NotImplementedError

    # accounting
    def server_snapshot(self) -> Any:
        return named_cpu(self.server_processes)

    def server_delta(self, before: Any, after: Any) -> float:
        return float(after - before)

    def counters(self) -> dict[str, float]:
        return {}

    def start_sampler(self) -> Any:
        return None

    def stop_sampler(self, sampler: Any) -> dict[str, Any]:
        return {}

    def start_lock_sampler(self, interval_s: float) -> Any:
        """Tasker: a :class:`LockWaitSampler` (stopped with ``stop_sampler``); peers: None."""
        return None

    # shared
    def worker_cpu(self) -> float:
        return tree_cpu([w.pid for w in self.workers if w.proc is not None])

    def check_alive(self) -> None:
        for worker in self.workers:
            worker.check_alive()

    def stop_workers(self) -> list[dict[str, Any]]:
        return [w.stop(self.args.stop_timeout) | {"label": w.label} for w in self.workers]


# Tasker ---------------------------------------------------------------------------------------


class PgCpu:
    """CPU of the PostgreSQL cluster serving the benchmark database.

    Counted: the postmaster and its children, except backends connected to *other* databases
    (other people's sessions on the same server). That keeps the benchmark database's backends
    (the workers', the client's, the driver's polling) and the shared auxiliary processes
    (walwriter, checkpointer, background writer, autovacuum).
    """

    def __init__(self, conn: Any) -> None:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.postmaster = psutil.Process(backend).ppid()
        self.conn = conn

    def snapshot(self) -> dict[tuple[int, float], float]:
        foreign = {
            row[0]
            for row in self.conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname IS NOT NULL AND datname <> current_database()"
            ).fetchall()
        }
        result: dict[tuple[int, float], float] = {}
        try:
            root = psutil.Process(self.postmaster)
            family = [root, *root.children(recursive=False)]
        except psutil.NoSuchProcess:
            return result
        for proc in family:
            if proc.pid in foreign:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                result[(proc.pid, proc.create_time())] = cpu_of(proc)
        return result

    @staticmethod
    def delta(before: dict[Any, float], after: dict[Any, float]) -> float:
        return sum(value - before.get(key, 0.0) for key, value in after.items())


class PostgresStats:
    """The database counters of a system whose server is the benchmark's PostgreSQL: commits,
    rows and WAL per step, with the workers' idle polling subtracted (``run_throughput`` reads
    them when ``counters`` returns any), the server's CPU and the wait sampler. Needs
    ``self.conn``, an autocommit connection to the system's own database, ``self.url`` and
    ``self.pg``; ``driver_queries`` counts the driver's transactions on it."""

    conn: Any
    url: str
    pg: PgCpu | None
    driver_queries = 0
    idle_rates: dict[str, float]

    def counters(self) -> dict[str, float]:
        row = self.conn.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_returned, "
            "       tup_fetched, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') "
            "FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        names = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "tup_returned")
        values = {name: float(value) for name, value in zip(names, row, strict=False)}
        values["tup_fetched"] = float(row[5])
        values["wal_bytes"] = float(row[6])
        values["driver_queries"] = float(self.driver_queries)
        for table, writes, seq_scans, seq_read, idx_fetch in self.conn.execute(
            "SELECT schemaname || '.' || relname, n_tup_ins + n_tup_upd + n_tup_del, "
            "       seq_scan, seq_tup_read, coalesce(idx_tup_fetch, 0) "
            "FROM pg_stat_user_tables"
        ).fetchall():
            values[f"rows_written:{table}"] = float(writes)
            values[f"seq_scans:{table}"] = float(seq_scans)
            values[f"rows_seq_read:{table}"] = float(seq_read)
            values[f"rows_idx_fetched:{table}"] = float(idx_fetch)
        self.driver_queries += 2
        return values

    def measure_idle_rates(self, delay_s: float) -> dict[str, float]:
        """Counter rates of the idle workers (their polling), to subtract from phases."""
        time.sleep(delay_s)
        before, began = self.counters(), time.monotonic()
        time.sleep(delay_s)
        after = self.counters()
        elapsed = time.monotonic() - began
        rates = {k: (after[k] - before.get(k, 0.0)) / elapsed for k in after}
        rates["xact_commit"] -= rates.pop("driver_queries")
        self.idle_rates = {k: v for k, v in rates.items() if v}
        return self.idle_rates

    def vacuum(self) -> None:
        self.conn.execute("VACUUM ANALYZE")

    def server_snapshot(self) -> Any:
        assert self.pg is not None
        return self.pg.snapshot()

    def server_delta(self, before: Any, after: Any) -> float:
        return PgCpu.delta(before, after)

    def start_sampler(self) -> Any:
        sampler = WaitSampler(self.url)
        sampler.start()
        return sampler

    def stop_sampler(self, sampler: Any) -> dict[str, Any]:
        sampler.stop_event.set()
        sampler.join(timeout=10)
        return dict(sampler.result())


class WaitSampler(threading.Thread):
    """Samples ``pg_stat_activity`` of the benchmark database every 50 ms (its own connection):
    what Tasker's backends are doing or waiting for while a throughput phase runs."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="wait-sampler")
        self.url = url
        self.stop_event = threading.Event()
        self.samples = 0
        self.states: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            me = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            while not self.stop_event.wait(0.05):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event, "
                    "       regexp_replace(left(query, 70), '\\s+', ' ', 'g') "
                    "FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> %s "
                    "  AND backend_type = 'client backend' AND state <> 'idle'",
                    (me,),
                ).fetchall()
                self.samples += 1
                for state, wtype, wevent, query in rows:
                    label = f"{state}:{wtype}:{wevent}" if wtype else f"{state}:on-cpu"
                    self.states[label] += 1
                    self.queries[query] += 1

    def result(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "interval_ms": 50,
            "note": "non-idle client backends of the benchmark db per sample; "
            "'active:on-cpu' means no wait event",
            "avg_active_backends": sum(self.states.values()) / self.samples if self.samples else 0,
            "states": dict(self.states.most_common(15)),
            "top_queries": dict(self.queries.most_common(12)),
        }


class LockWaitSampler(threading.Thread):
    """How long Tasker's backends waited on heavyweight locks (row locks: ``Lock:tuple``,
    ``Lock:transactionid``), sampled every ``interval_s`` (default 5 ms) on its own connection.

    Each sample counts the non-idle client backends of the benchmark database by state and wait
    event. A sample stands for the time since the previous one, so ``waiters x interval``
    summed over the samples estimates the backend-seconds spent waiting (unbiased whatever the
    length of the waits; the sampler's own query time is part of the interval). While someone
    waits, at most every 50 ms, it also reads the ungranted locks from ``pg_locks`` (lock type,
    relation, mode), to say on what they wait.
    """

    DETAIL_EVERY_S = 0.05

    def __init__(self, url: str, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True, name="lock-wait-sampler")
        self.url = url
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.samples = 0
        self.queries = 0  # transactions of the sampler (the driver subtracts them from commits)
        self.sampled_s = 0.0
        self.busy_s = 0.0  # non-idle backend-seconds (active or idle in transaction)
        self.wait_s = 0.0  # backend-seconds waiting on a Lock
        self.with_waiters_s = 0.0  # wall seconds with at least one waiter
        self.by_event: Counter[str] = Counter()  # state:wait_event_type:wait_event -> seconds
        self.waiters_hist: Counter[int] = Counter()  # waiters in a sample -> samples
        self.waiting_queries: Counter[str] = Counter()  # waiters' queries -> samples
        self.locks: Counter[str] = Counter()  # pg_locks: locktype relation mode -> backends
        self.detail_samples = 0
        self.max_waiters = 0
        self.max_busy = 0
        self.backend_cpu_s: float | None = None
        self.thread_cpu_s = 0.0

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported, never raised into the phase
            self.error = f"{exc.__class__.__name__}: {exc}"

    def _run(self) -> None:
        import psycopg

        cpu_began = time.thread_time()
        with psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="tasker-wfbench-locks"
        ) as conn:
            me = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            backend = psutil.Process(me)
            backend_began = cpu_of(backend)
            last = time.monotonic()
            last_detail = 0.0
            while not self.stop_event.wait(self.interval_s):
                rows = conn.execute(
                    "SELECT state, coalesce(wait_event_type, ''), coalesce(wait_event, ''), "
                    "       CASE WHEN wait_event_type = 'Lock' THEN left(query, 60) END, "
                    "       count(*) "
                    "FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "  AND backend_type = 'client backend' AND state <> 'idle' "
                    "GROUP BY 1, 2, 3, 4",
                ).fetchall()
                now = time.monotonic()
                dt_s, last = now - last, now
                self.samples += 1
                self.queries += 1
                self.sampled_s += dt_s
                waiters = busy = 0
                for state, wtype, wevent, query, count in rows:
                    busy += count
                    label = f"{state}:{wtype}:{wevent}" if wtype else f"{state}:on-cpu"
                    self.by_event[label] += count * dt_s
                    if wtype == "Lock":
                        waiters += count
                        self.waiting_queries[" ".join((query or "").split())] += count
                self.busy_s += busy * dt_s
                self.wait_s += waiters * dt_s
                self.waiters_hist[waiters] += 1
                self.max_waiters = max(self.max_waiters, waiters)
                self.max_busy = max(self.max_busy, busy)
                if waiters:
                    self.with_waiters_s += dt_s
                    if now - last_detail >= self.DETAIL_EVERY_S:
                        last_detail = now
                        self._detail(conn)
            with contextlib.suppress(psutil.Error):
                self.backend_cpu_s = cpu_of(backend) - backend_began
        self.thread_cpu_s = time.thread_time() - cpu_began

    def _detail(self, conn: Any) -> None:
        rows = conn.execute(
            "SELECT l.locktype, coalesce(l.relation::regclass::text, ''), l.mode, count(*) "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND a.datname = current_database() "
            "GROUP BY 1, 2, 3"
        ).fetchall()
        self.queries += 1
        self.detail_samples += 1
        for locktype, relation, mode, count in rows:
            self.locks[" ".join(part for part in (locktype, relation, mode) if part)] += count

    def result(self) -> dict[str, Any]:
        lock_events: Counter[str] = Counter()
        for label, seconds in self.by_event.items():
            if ":Lock:" in label:
                lock_events[label.split(":", 1)[1]] += seconds
        return {
            "interval_ms": self.interval_s * 1000,
            "samples": self.samples,
            "queries": self.queries,
            "mean_sample_interval_ms": 1000 * self.sampled_s / self.samples
            if self.samples
            else None,
            "sampled_seconds": self.sampled_s,
            "lock_wait_seconds": self.wait_s,
            "lock_wait_seconds_by_event": {k: round(v, 4) for k, v in lock_events.most_common()},
            "busy_backend_seconds": self.busy_s,
            "lock_wait_share_of_busy": self.wait_s / self.busy_s if self.busy_s else None,
            "share_of_time_with_waiters": self.with_waiters_s / self.sampled_s
            if self.sampled_s
            else None,
            "mean_waiters": self.wait_s / self.sampled_s if self.sampled_s else None,
            "max_waiters": self.max_waiters,
            "max_busy_backends": self.max_busy,
            "waiters_histogram": {str(k): v for k, v in sorted(self.waiters_hist.items())},
            "backend_seconds_by_state": {k: round(v, 4) for k, v in self.by_event.most_common(15)},
            "waiting_queries": dict(self.waiting_queries.most_common(5)),
            "ungranted_locks": dict(self.locks.most_common(10)),
            "ungranted_lock_samples": self.detail_samples,
            "sampler_cpu_s": {"backend": self.backend_cpu_s, "driver_thread": self.thread_cpu_s},
            "error": self.error,
            "note": "non-idle client backends of the benchmark db, sampled every interval_ms "
            "on the sampler's own connection; seconds are backend-seconds (sum over samples of "
            "backends x time since the previous sample); 'busy' = active or idle in "
            "transaction; ungranted_locks counts waiting backends over ungranted_lock_samples "
            "reads of pg_locks (at most every 50 ms while someone waits); the sampler's "
            "backend is in the phase's server CPU",
        }


class TaskerSystem(PostgresStats, System):
    server_processes = ("postgres",)

    def __init__(self, mode: str, *a: Any, variant: str = "") -> None:
        """``variant`` (the history comparison's ``empty``/``history``) gets its own database
        ``<name>_<mode>_<variant>``, ledger and worker log."""
        self.key = f"tasker-{mode}" + (f"-{variant}" if variant else "")
        self.mode = mode
        super().__init__(*a)
        base = urlsplit(self.args.database_url).path.lstrip("/") or "tasker_wfbench"
        suffix = f"_{mode}" + (f"_{variant}" if variant else "")
        self.url = with_database(self.args.database_url, base + suffix)
        self.description = (
            f"python -m dramatiq tasker.actors bench._bench_flows --processes "
            f"{self.args.processes} --threads {self.args.threads}; "
            f"TASKER_ENV=production, TASKER_ENGINE__RESULT_PROCESSING={mode}"
        )
        self.conn: Any = None
        self.driver_queries = 0  # the driver's own transactions on the benchmark db
        self.idle_rates: dict[str, float] = {}
        self.client: Any = None
        self.pg: PgCpu | None = None
        self.flows: Any = None

    def connect(self, url: str | None = None) -> Any:
        import psycopg

        return psycopg.connect(
            url or self.url,
            autocommit=True,
            connect_timeout=5,
            application_name="tasker-wfbench-driver",
        )

    def setup(self) -> None:
        from psycopg import sql

        name = urlsplit(self.url).path.lstrip("/")
        try:
            admin = self.connect(with_database(self.url, "postgres"))
        except Exception as exc:
            raise UnavailableError(f"PostgreSQL: {exc}") from exc
        if "bench" not in name:
            raise BenchError(f"Refusing to drop database {name!r}: its name must contain 'bench'.")
        with admin:
            ident = sql.Identifier(name)
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        from tasker.db.migrate import migrate

        migrate(self.url)
        self.conn = self.connect()
        self.pg = PgCpu(self.conn)
        settings = (
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "shared_buffers",
            "max_wal_size",
            "autovacuum",
            "max_connections",
            "data_directory",
        )
        info: dict[str, Any] = {
            "database": name,
            "version": self.conn.execute("SELECT version()").fetchone()[0],
        }
        for setting in settings:
            info[setting] = self.conn.execute(f"SHOW {setting}").fetchone()[0]
        self.info = info
        import tasker
        from bench import _bench_flows

        self.flows = _bench_flows
        self.client = tasker.Client(url=self.url)

    def start_workers(self) -> None:
        env = clean_env() | {
            "TASKER_DATABASE__URL": self.url,
            "TASKER_ENV": "production",
            "TASKER_ENGINE__RESULT_PROCESSING": self.mode,
            "BENCH_LEDGER": str(self.ledger),
            "PYTHONUNBUFFERED": "1",
        }
        command = dramatiq_command(
            "tasker.actors",
            "bench._bench_flows",
            processes=self.args.processes,
            threads=self.args.threads,
            path=REPO_ROOT,
        )
        worker = Worker(self.key, command, env, self.logdir / f"{self.key}.log")
        worker.start()
        self.workers = [worker]

    def ready(self) -> bool:
        worker = self.workers[0]
        worker.check_alive()
        if worker.log_count("Worker process is ready for action") < self.args.processes:
            return False
        registered = self.conn.execute(
            "SELECT count(*) FROM tasker.named_tasks nt "
            "JOIN tasker.task_namespaces ns USING (task_namespace_uuid) WHERE ns.name = %s",
            (self.flows.NAMESPACE,),
        ).fetchone()[0]
        return int(registered) >= len(self.flows.WORKFLOW_NAMES)

    def submit(self, workload: Workload, workflow_id: str) -> str:
        handle = self.client.submit(
            self.flows.NAMESPACE,
            self.flows.WORKFLOW_NAMES[workload.key],
            {"workflow_id": workflow_id, "pad": "x" * 48},
        )
        return str(handle.task_uuid)

    def done(self, workload: Workload, ids: list[str]) -> int:
        self.driver_queries += 1
        complete, failed = self.conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'complete'), "
            "       count(*) FILTER (WHERE state = ANY(%s)) "
            "FROM tasker.tasks WHERE task_uuid = ANY(%s::uuid[])",
            (list(TERMINAL_ERROR_STATES), ids),
        ).fetchone()
        if failed:
            raise BenchError(f"{failed} Tasker task(s) ended in an error state.")
        return int(complete)

    def collect(self, workload: Workload, ids: list[str]) -> Collected:
        rows = self.conn.execute(
            "SELECT t.task_uuid::text, t.completed_at, s.name, s.started_at, s.finished_at, "
            "       s.attempts "
            "FROM tasker.tasks t JOIN tasker.workflow_steps s USING (task_uuid) "
            "WHERE t.task_uuid = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
        timings: Timings = {}
        completed: dict[str, int] = {}
        last_step: dict[str, int] = {}
        retried = 0
        for task, completed_at, name, started, finished, attempts in rows:
            if completed_at is not None:
                completed[task] = ts_ns(completed_at)
            if started is not None and finished is not None:
                timings.setdefault(task, {})[name] = (ts_ns(started), ts_ns(finished))
                if name == workload.final:
                    last_step[task] = ts_ns(finished)
            retried += int(attempts > 1)
        self.driver_queries += 2
        step_rows, task_rows, final_rows = self.conn.execute(
            "SELECT (SELECT count(*) FROM tasker.workflow_step_transitions x "
            "        JOIN tasker.workflow_steps s USING (workflow_step_uuid) "
            "        WHERE s.task_uuid = ANY(%(ids)s::uuid[])), "
            "       (SELECT count(*) FROM tasker.task_transitions "
            "        WHERE task_uuid = ANY(%(ids)s::uuid[])), "
            "       (SELECT count(*) FROM tasker.finalization_attempts "
            "        WHERE task_uuid = ANY(%(ids)s::uuid[]))",
            {"ids": ids},
        ).fetchone()
        steps = len(ids) * workload.steps
        tail = LedgerTail(self.ledger)
        tail.poll()
        return Collected(
            timings,
            completed,
            {
                "steps_with_more_than_one_attempt": retried,
                "ledger_duplicates": tail.duplicates,
                "audit_rows_per_step": {
                    "workflow_step_transitions": step_rows / steps,
                    "task_transitions": task_rows / steps,
                    "finalization_attempts": final_rows / steps,
                },
            },
            handler_timings=tail.timings,
            last_step_ns=last_step,
        )

    def start_lock_sampler(self, interval_s: float) -> Any:
        sampler = LockWaitSampler(self.url, interval_s)
        sampler.start()
        return sampler

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


# peers ----------------------------------------------------------------------------------------


class PeerSystem(System):
    """Peers: completion and timings come from the ledger file."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.tail = LedgerTail(self.ledger)

    def done(self, workload: Workload, ids: list[str]) -> int:
        self.tail.poll()
        return sum(1 for i in ids if workload.final in self.tail.timings.get(i, {}))

    def collect(self, workload: Workload, ids: list[str]) -> Collected:
        self.tail.poll()
        completed = {
            i: self.tail.timings[i][workload.final][1]
            for i in ids
            if workload.final in self.tail.timings.get(i, {})
        }
        return Collected(self.tail.timings, completed, {"ledger_duplicates": self.tail.duplicates})

    def redis_client(self) -> Any:
        import redis

        url = self.args.redis_url
        return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)

    def redis_info(self) -> dict[str, Any]:
        client = self.redis_client()
        info: dict[str, Any] = {"version": client.info("server").get("redis_version")}
        for key in ("appendonly", "appendfsync", "save"):
            try:
                info[key] = client.config_get(key).get(key)
            except Exception as exc:
                info[key] = f"unreadable: {exc.__class__.__name__}"
        return info

    def delete_redis_prefix(self, prefix: str) -> int:
        client = self.redis_client()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)


class DramatiqSystem(PeerSystem):
    key = "dramatiq"
    server_processes = ("beam.smp", "redis-server")

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.description = (
            f"python -m dramatiq bench._bench_peers_dramatiq --processes {self.args.processes} "
            f"--threads {self.args.threads}; RabbitmqBroker(confirm_delivery=True); "
            "GroupCallbacks on Redis"
        )
        self.module: Any = None
        self.broker: Any = None
        self.actors: Any = None

    def channel(self) -> Any:
        return rabbitmq_channel(self.args.rabbitmq_url)

    def queue_names(self) -> list[str]:
        queue = self.module.QUEUE
        return [queue, f"{queue}.DQ", f"{queue}.XQ"]

    def setup(self) -> None:
        try:
            from bench import _bench_peers_dramatiq
        except ImportError as exc:
            raise UnavailableError(f"import failed: {exc}") from exc
        self.module = _bench_peers_dramatiq
        try:
            with self.channel() as channel:
                props = channel.connection._impl.server_properties
                version = props.get("version", b"")
                rabbit = {"version": version.decode() if isinstance(version, bytes) else version}
        except Exception as exc:
            raise UnavailableError(f"RabbitMQ: {exc.__class__.__name__}: {exc}") from exc
        try:
            self.info = {"rabbitmq": rabbit, "redis": self.redis_info()}
        except Exception as exc:
            raise UnavailableError(f"Redis: {exc.__class__.__name__}: {exc}") from exc
        self.cleanup()
        self.broker = self.module.make_broker(self.args.rabbitmq_url, self.args.redis_url)
        self.actors = self.module.Actors(self.broker)

    def start_workers(self) -> None:
        env = clean_env() | {
            "BENCH_DRAMATIQ_WORKER": "1",
            "BENCH_RABBITMQ_URL": self.args.rabbitmq_url,
            "BENCH_REDIS_URL": self.args.redis_url,
            "BENCH_LEDGER": str(self.ledger),
            "PYTHONUNBUFFERED": "1",
        }
        command = dramatiq_command(
            "bench._bench_peers_dramatiq",
            processes=self.args.processes,
            threads=self.args.threads,
            path=REPO_ROOT,
        )
        worker = Worker(self.key, command, env, self.logdir / f"{self.key}.log")
        worker.start()
        self.workers = [worker]

    def ready(self) -> bool:
        self.check_alive()
        return (
            self.workers[0].log_count("Worker process is ready for action") >= self.args.processes
        )

    def submit(self, workload: Workload, workflow_id: str) -> str:
        self.actors.submit(workload.key, workflow_id)
        return workflow_id

    def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.close()

    def cleanup(self) -> None:
        if self.module is None:
            return
        with self.channel() as channel:
            for name in self.queue_names():
                channel.queue_delete(queue=name)
        self.delete_redis_prefix(self.module.REDIS_PREFIX)


class CelerySystem(PeerSystem):
    key = "celery"
    server_processes = ("redis-server",)

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.module: Any = None
        self.ready_file = self.workdir / "celery.ready"
        self.ready_file.write_bytes(b"")
        if self.args.celery_pool == "threads":
            self.shape = [("threads", self.args.threads)] * self.args.processes
        else:
            self.shape = [("prefork", self.args.processes * self.args.threads)]
        self.description = " + ".join(
            f"celery -A bench._bench_peers_celery worker --pool {pool} --concurrency {n}"
            for pool, n in self.shape
        )

    def setup(self) -> None:
        os.environ["BENCH_REDIS_URL"] = self.args.redis_url
        try:
            from bench import _bench_peers_celery
        except ImportError as exc:
            raise UnavailableError(f"celery is not installed or failed to import: {exc}") from exc
        self.module = _bench_peers_celery
        try:
            self.info = {"redis": self.redis_info()}
        except Exception as exc:
            raise UnavailableError(f"Redis: {exc.__class__.__name__}: {exc}") from exc
        self.cleanup()

    def start_workers(self) -> None:
        env = clean_env() | {
            "BENCH_REDIS_URL": self.args.redis_url,
            "BENCH_LEDGER": str(self.ledger),
            "BENCH_READY_FILE": str(self.ready_file),
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.workers = []
        for index, (pool, concurrency) in enumerate(self.shape, start=1):
            command = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench._bench_peers_celery",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "-n",
                f"wfbench{index}@%h",
                "-Q",
                self.module.QUEUE,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ]
            label = f"{self.key}-{index}"
            worker = Worker(label, command, env, self.logdir / f"{label}.log")
            worker.start()
            self.workers.append(worker)

    def ready(self) -> bool:
        self.check_alive()
        lines = self.ready_file.read_text().splitlines()
        return len(lines) >= len(self.workers)

    def submit(self, workload: Workload, workflow_id: str) -> str:
        self.module.submit(workload.key, workflow_id)
        return workflow_id

    def close(self) -> None:
        if self.module is None:
            return
        # The client subscribed to the result of every workflow it sent (Celery's Redis result
        # backend does that for each AsyncResult). Drop them while the interpreter is alive, so
        # their __del__ does not try to unsubscribe during interpreter shutdown.
        backend = self.module.app.backend
        with contextlib.suppress(Exception):
            for mapping in backend._pending_results:
                mapping.clear()
            gc.collect()
        with contextlib.suppress(Exception):
            backend.result_consumer.stop()
        with contextlib.suppress(Exception):
            self.module.app.close()

    def cleanup(self) -> None:
        if self.module is not None:
            self.delete_redis_prefix(self.module.REDIS_PREFIX)


class DbosSystem(PostgresStats, PeerSystem):
    """DBOS Transact (``bench/_bench_peers_dbos.py``): durable workflows whose system database is
    ``<name>_dbos`` on the benchmark's PostgreSQL. Counted like Tasker: the worker process trees
    and the PostgreSQL cluster less the backends of other databases, and the database's commits,
    rows and WAL per step (``PostgresStats``)."""

    key = "dbos"
    server_processes = ("postgres",)

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        base = urlsplit(self.args.database_url).path.lstrip("/") or "tasker_wfbench"
        self.url = with_database(self.args.database_url, base + "_dbos")
        self.ready_file = self.workdir / "dbos.ready"
        self.ready_file.write_bytes(b"")
        self.description = (
            f"python -m bench._bench_peers_dbos, {self.args.processes} processes (DBOS "
            f"executors); steps on a DBOS queue with worker_concurrency {self.args.threads}, "
            "queues and handles polled every 10 ms"
        )
        self.module: Any = None
        self.submitter: Any = None
        self.conn: Any = None
        self.pg: PgCpu | None = None
        # workflows in progress per process (see the module); clean_env drops BENCH_* variables
        self.workflow_concurrency = os.environ.get("BENCH_DBOS_WORKFLOW_CONCURRENCY")

    def setup(self) -> None:
        import psycopg
        from psycopg import sql

        try:
            from bench import _bench_peers_dbos
        except ImportError as exc:
            raise UnavailableError(f"dbos is not installed or failed to import: {exc}") from exc
        self.module = _bench_peers_dbos
        name = urlsplit(self.url).path.lstrip("/")
        if "bench" not in name:
            raise BenchError(f"Refusing to drop database {name!r}: its name must contain 'bench'.")
        try:
            admin = psycopg.connect(
                with_database(self.url, "postgres"), autocommit=True, connect_timeout=5
            )
        except Exception as exc:
            raise UnavailableError(f"PostgreSQL: {exc}") from exc
        with admin:
            ident = sql.Identifier(name)
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        self.module.create_schema(self.url)
        self.conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="tasker-wfbench-driver"
        )
        self.pg = PgCpu(self.conn)
        self.info = {
            "database": name,
            "version": self.conn.execute("SELECT version()").fetchone()[0],
            "synchronous_commit": self.conn.execute("SHOW synchronous_commit").fetchone()[0],
            "data_directory": self.conn.execute("SHOW data_directory").fetchone()[0],
            "queues": [self.module.WORKFLOW_QUEUE, self.module.STEP_QUEUE],
            "polling_interval_s": self.module.POLLING_INTERVAL_S,
            "workflow_worker_concurrency": int(self.workflow_concurrency or self.args.threads),
        }
        self.submitter = self.module.Submitter(self.url)

    def start_workers(self) -> None:
        self.workers = []
        for index in range(1, self.args.processes + 1):
            env = clean_env() | {
                "BENCH_DBOS_URL": self.url,
                "BENCH_DBOS_EXECUTOR": f"wfbench-{index}",
                "BENCH_DBOS_THREADS": str(self.args.threads),
                "BENCH_DBOS_WORKFLOW_CONCURRENCY": str(self.info["workflow_worker_concurrency"]),
                "BENCH_LEDGER": str(self.ledger),
                "BENCH_READY_FILE": str(self.ready_file),
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1",
            }
            command = [sys.executable, "-m", "bench._bench_peers_dbos"]
            label = f"{self.key}-{index}"
            worker = Worker(label, command, env, self.logdir / f"{label}.log")
            worker.start()
            self.workers.append(worker)

    def ready(self) -> bool:
        self.check_alive()
        return len(self.ready_file.read_text().splitlines()) >= len(self.workers)

    def submit(self, workload: Workload, workflow_id: str) -> str:
        self.submitter.submit(workload.key, workflow_id)
        return workflow_id

    def collect(self, workload: Workload, ids: list[str]) -> Collected:
        """The ledger, plus DBOS's own view: a workflow records SUCCESS one handle poll after
        its final step, so wait (bounded) for every one of them before the next phase."""
        got = super().collect(workload, ids)
        deadline = time.monotonic() + 10
        while True:
            rows = self.conn.execute(
                "SELECT status, updated_at FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
                (ids,),
            ).fetchall()
            states = Counter(status for status, _ in rows)
            if states.get("SUCCESS", 0) >= len(ids) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        got.extra["workflow_status"] = dict(states)
        return got

    def close(self) -> None:
        if self.submitter is not None:
            with contextlib.suppress(Exception):
                self.submitter.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


def make_system(key: str, args: argparse.Namespace, logdir: Path, workdir: Path) -> System:
    if key == "tasker-inline":
        return TaskerSystem("inline", args, logdir, workdir)
    if key == "tasker-decoupled":
        return TaskerSystem("decoupled", args, logdir, workdir)
    if key == "dramatiq":
        return DramatiqSystem(args, logdir, workdir)
    if key == "celery":
        return CelerySystem(args, logdir, workdir)
    if key == "dbos":
        return DbosSystem(args, logdir, workdir)
    raise ValueError(key)


# -- phases -------------------------------------------------------------------------------------


def wait_done(
    system: System, workload: Workload, ids: list[str], timeout_s: float, poll_s: float
) -> int:
    """Poll until every workflow in ``ids`` completed; returns the detection time (ns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = system.done(workload, ids)
        if done >= len(ids):
            return time.time_ns()
        system.check_alive()
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{system.key} {workload.key}: only {done}/{len(ids)} workflows completed "
                f"after {timeout_s:.0f} s."
            )
        time.sleep(poll_s)


def summarize_handoffs(workload: Workload, timings: Timings | None, ids: list[str]) -> Any:
    if timings is None:
        return None
    return percentiles(handoffs_ms(workload, timings, ids))


def phase_timeout(args: argparse.Namespace, workload: Workload, count: int) -> float:
    """``--phase-timeout``, scaled up for phases of more than 800 steps (W1's 200 workflows):
    the wide and long shapes must get the time to complete."""
    return float(args.phase_timeout * max(1.0, count * workload.steps / 800))


def add_fan_in(result: dict[str, Any], workload: Workload, got: Collected, ids: list[str]) -> None:
    """A fan-out/fan-in's fan-out, sibling spread and fan-in handoff (``fan_in_ms``)."""
    if fan(workload) is None:
        return
    result["fan_in_ms"] = fan_in_ms(workload, got.timings, ids)
    if got.handler_timings is not None:
        result["fan_in_ms_handler_ledger"] = fan_in_ms(workload, got.handler_timings, ids)


def run_warmup(
    system: System, workload: Workload, count: int, tag: str, timeout: float
) -> list[str]:
    ids = [system.submit(workload, f"{tag}-warm-{workload.key}-{i}") for i in range(count)]
    wait_done(system, workload, ids, timeout, 0.02)
    return ids


def run_throughput(
    system: System, workload: Workload, count: int, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    if isinstance(system, PostgresStats):
        system.vacuum()
        time.sleep(max(args.settle, args.stats_delay))  # earlier phases' statistics flushed
    else:
        time.sleep(args.settle)
    sampler = system.start_sampler()
    locks = None
    if workload.key in args.lock_sample:
        locks = system.start_lock_sampler(args.lock_sample_ms / 1000)
    counters_before = system.counters()
    counters_before_t = time.monotonic()
    worker_before = system.worker_cpu()
    server_before = system.server_snapshot()
    driver_before = time.process_time()
    began_ns = time.time_ns()
    ids = [system.submit(workload, f"{tag}-tp-{workload.key}-{i}") for i in range(count)]
    submitted_ns = time.time_ns()
    detected_ns = wait_done(system, workload, ids, phase_timeout(args, workload, count), 0.05)
    worker_after = system.worker_cpu()
    server_after = system.server_snapshot()
    driver_cpu = time.process_time() - driver_before
    waits = system.stop_sampler(sampler) if sampler is not None else None
    lock_waits = system.stop_sampler(locks) if locks is not None else None
    if counters_before:
        time.sleep(args.stats_delay)  # idle backends report their statistics up to 10 s late
    counters_after = system.counters()
    counters_window_s = time.monotonic() - counters_before_t
    got = system.collect(workload, ids)
    finished_ns = max(got.completed_ns.values())
    wall_s = (finished_ns - began_ns) / 1e9
    steps = count * workload.steps
    worker_s = worker_after - worker_before
    server_s = system.server_delta(server_before, server_after)
    result: dict[str, Any] = {
        "workflows": count,
        "steps": steps,
        "submit_seconds": (submitted_ns - began_ns) / 1e9,
        "submit_workflows_per_s": count / ((submitted_ns - began_ns) / 1e9),
        "wall_seconds": wall_s,
        "workflows_per_s": count / wall_s,
        "steps_per_s": steps / wall_s,
        "detected_after_s": (detected_ns - began_ns) / 1e9,
        "completion_after_submit_start_ms": percentiles(
            [(ns - began_ns) / 1e6 for ns in got.completed_ns.values()]
        ),
        "handoff_ms": summarize_handoffs(workload, got.timings, ids),
        "handoff_ms_handler_ledger": summarize_handoffs(workload, got.handler_timings, ids),
        "cpu_seconds": {"worker": worker_s, "server": server_s, "driver": driver_cpu},
        "cpu_ms_per_step": {
            "worker": 1000 * worker_s / steps,
            "server": 1000 * server_s / steps,
            "total": 1000 * (worker_s + server_s) / steps,
        },
        "cpu_window_s": (detected_ns - began_ns) / 1e9,
        # how much of the machine the system under test got: well below ~0.8 means other
        # processes were competing for the cores during this phase
        "share_of_cores_used": (worker_s + server_s)
        / ((detected_ns - began_ns) / 1e9)
        / len(os.sched_getaffinity(0)),
        "server_processes": list(system.server_processes),
        "checks": got.extra,
    }
    if got.last_step_ns:
        last = max(got.last_step_ns.values())
        result["last_step_finished_after_s"] = (last - began_ns) / 1e9
    if counters_before and counters_after:
        delta = {k: counters_after[k] - counters_before.get(k, 0.0) for k in counters_after}
        driver = delta.pop("driver_queries") + (waits or {}).get("samples", 0)
        driver += (lock_waits or {}).get("queries", 0)
        idle = getattr(system, "idle_rates", {})
        idle_commits = idle.get("xact_commit", 0.0) * counters_window_s

        def by_table(prefix: str) -> dict[str, float]:
            return {
                k.split(":", 1)[1]: round(v / steps, 2)
                for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
                if k.startswith(prefix + ":") and v
            }

        result["db_per_step"] = {
            "commits": (delta["xact_commit"] - driver - idle_commits) / steps,
            "commits_raw": delta["xact_commit"] / steps,
            "driver_queries_subtracted": driver,
            "idle_commits_subtracted": idle_commits,
            "counters_window_s": counters_window_s,
            "reliable": args.stats_delay >= 10,
            "rows_inserted": delta["tup_inserted"] / steps,
            "rows_updated": delta["tup_updated"] / steps,
            "rows_deleted": delta["tup_deleted"] / steps,
            "rows_returned": delta["tup_returned"] / steps,
            "rows_written_by_table": by_table("rows_written"),
            "seq_scans_by_table": by_table("seq_scans"),
            "rows_seq_read_by_table": by_table("rows_seq_read"),
            "rows_idx_fetched_by_table": by_table("rows_idx_fetched"),
            "wal_bytes": delta["wal_bytes"] / steps,
            "note": "from pg_stat_database/pg_stat_user_tables of the benchmark db, read "
            "--stats-delay s before and after the phase (an idle backend reports its "
            "statistics up to 10 s late; below 10 s the numbers are not reliable); includes "
            "the client's submits; 'commits' subtracts the driver's own queries and the "
            "workers' idle polling (rate measured before the first workload); rows and WAL "
            "are not corrected (WAL is cluster-wide)",
        }
    if waits is not None:
        result["pg_activity"] = waits
    if lock_waits is not None:
        lock_waits["lock_wait_ms_per_step"] = 1000 * lock_waits["lock_wait_seconds"] / steps
        lock_waits["lock_wait_share_of_wall"] = lock_waits["lock_wait_seconds"] / wall_s
        result["lock_waits"] = lock_waits
    add_fan_in(result, workload, got, ids)
    return result


def run_latency(
    system: System, workload: Workload, count: int, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    time.sleep(args.settle)
    submitted: dict[str, int] = {}
    ids: list[str] = []
    for i in range(count):
        began = time.time_ns()
        workflow = system.submit(workload, f"{tag}-lat-{workload.key}-{i}")
        submitted[workflow] = began
        ids.append(workflow)
        wait_done(system, workload, [workflow], phase_timeout(args, workload, 1), 0.01)
        time.sleep(args.latency_gap_ms / 1000)
    got = system.collect(workload, ids)
    e2e = [(got.completed_ns[i] - submitted[i]) / 1e6 for i in ids if i in got.completed_ns]
    result: dict[str, Any] = {
        "workflows": count,
        "gap_ms": args.latency_gap_ms,
        "e2e_ms": percentiles(e2e),
        "handoff_ms": summarize_handoffs(workload, got.timings, ids),
        "handoff_ms_handler_ledger": summarize_handoffs(workload, got.handler_timings, ids),
        "first_step_start_ms": percentiles(
            [
                (got.timings[i][workload.root][0] - submitted[i]) / 1e6
                for i in ids
                if workload.root in got.timings.get(i, {})
            ]
        ),
        "checks": got.extra,
    }
    if got.last_step_ns:
        result["e2e_to_last_step_finished_ms"] = percentiles(
            [(got.last_step_ns[i] - submitted[i]) / 1e6 for i in ids if i in got.last_step_ns]
        )
    add_fan_in(result, workload, got, ids)
    return result


def run_system(system: System, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    from bench.broker_throughput import git_revision

    entry: dict[str, Any] = {
        "status": "ok",
        "description": system.description,
        "workloads": {},
        # the tree can change under a long run (other people commit): record it per system
        "git_at_setup": git_revision(),
    }
    try:
        system.setup()
    except UnavailableError as exc:
        print(f"[{system.key}] unavailable: {exc}", flush=True)
        return {"status": "unavailable", "error": str(exc), "description": system.description}
    entry["service"] = system.info
    try:
        boot = time.monotonic()
        system.start_workers()
        wait_until(system.ready, args.boot_timeout, f"{system.key} workers to be ready", 0.1)
        entry["boot_seconds"] = round(time.monotonic() - boot, 2)
        print(f"[{system.key}] workers ready in {entry['boot_seconds']} s", flush=True)
        if isinstance(system, PostgresStats) and args.stats_delay > 0:
            entry["idle_db_rates_per_s"] = system.measure_idle_rates(args.stats_delay)
        for key in args.workloads:
            workload = WORKLOADS[key]
            warm = args.warmup[key]
            run_warmup(system, workload, warm, tag, phase_timeout(args, workload, warm))
            count = args.throughput_workflows[key]
            tp = run_throughput(system, workload, count, tag, args)
            print(
                f"[{system.key}] {key} throughput: {count} workflows, "
                f"{tp['workflows_per_s']:.1f} wf/s, {tp['steps_per_s']:.0f} steps/s, "
                f"handoff p50 {tp['handoff_ms'].get('p50', float('nan')):.1f} ms, "
                f"CPU {tp['cpu_ms_per_step']['total']:.2f} ms/step",
                flush=True,
            )
            if "lock_waits" in tp:
                print(f"[{system.key}] {key} {lock_wait_line(tp)}", flush=True)
            lat = run_latency(system, workload, args.latency_counts[key], tag, args)
            print(
                f"[{system.key}] {key} latency: e2e p50 {lat['e2e_ms'].get('p50', 0):.1f} ms, "
                f"p95 {lat['e2e_ms'].get('p95', 0):.1f} ms, handoff p50 "
                f"{lat['handoff_ms'].get('p50', float('nan')):.2f} ms",
                flush=True,
            )
            entry["workloads"][key] = {"throughput": tp, "latency": lat}
    except Exception as exc:
        entry["status"] = "error"
        entry["error"] = f"{exc.__class__.__name__}: {exc}"
        print(f"[{system.key}] failed: {entry['error']}", flush=True)
    finally:
        entry["worker_stop"] = system.stop_workers()
        entry["worker_log_issues"] = {w.label: log_issues(w.log) for w in system.workers}
        system.close()
        try:
            system.cleanup()
        except Exception as exc:
            entry["cleanup_error"] = f"{exc.__class__.__name__}: {exc}"
    return entry


# -- repetitions ----------------------------------------------------------------------------------

#: diagnostics of a phase that are not metrics to take the median of (keys containing "_by_",
#: breakdowns by table, event or state, are skipped too)
SPREAD_SKIP = ("pg_activity", "checks", "waiters_histogram", "waiting_queries", "ungranted_locks")


def run_repetitions(
    args: argparse.Namespace, logdir: Path, workdir: Path, tag: str
) -> dict[str, Any]:
    """``--repeat`` runs of every system, interleaved: repetition 1 of every system, then
    repetition 2 of every system, and so on, so that a drift of the shared machine hits every
    system alike. Each repetition is a whole ``run_system``: a fresh database, fresh workers
    (their logs in ``rep<N>/``), its own warm-up. A system that was unavailable or failed is
    not run again."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in args.systems}
    for rep in range(1, args.repeat + 1):
        for key in args.systems:
            if runs[key] and runs[key][-1]["status"] != "ok":
                continue
            rep_logdir = logdir / f"rep{rep}" if args.repeat > 1 else logdir
            rep_logdir.mkdir(exist_ok=True)
            system = make_system(key, args, rep_logdir, workdir)
            print(f"[{key}] repetition {rep}/{args.repeat}: {system.description}", flush=True)
            runs[key].append(run_system(system, args, f"{tag}-r{rep}"))
    return {key: merge_repetitions(entries) for key, entries in runs.items()}


def merge_repetitions(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's entry over its repetitions. ``workloads[w]`` keeps the shape of a single
    run (``throughput``, ``latency``: the phases of the median repetition) and adds
    ``summary`` (median, min, max and every value of each number, over the repetitions) and
    ``repetitions`` (every phase). ``repetitions`` at the top has what each run recorded
    besides its workloads (boot, idle rates, worker stops and log issues, errors)."""
    merged = {k: v for k, v in entries[0].items() if k != "workloads"}
    failed = [e for e in entries if e["status"] != "ok"]
    if failed:
        merged["status"], merged["error"] = failed[0]["status"], failed[0].get("error")
    merged["repetitions"] = [
        {"rep": rep, **{k: v for k, v in e.items() if k != "workloads"}}
        for rep, e in enumerate(entries, start=1)
    ]
    phases: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        for key, phase in entry.get("workloads", {}).items():
            phases.setdefault(key, []).append(phase)
    merged["workloads"] = {key: merge_phases(runs) for key, runs in phases.items()}
    return merged


def merge_phases(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median_run(kind: str, path: tuple[str, ...]) -> dict[str, Any]:
        ordered = sorted(runs, key=lambda run: dig(run[kind], path) or 0.0)
        return dict(ordered[(len(ordered) - 1) // 2][kind])

    return {
        "throughput": median_run("throughput", ("steps_per_s",)),
        "latency": median_run("latency", ("e2e_ms", "p50")),
        "summary": spread(runs),
        "repetitions": runs,
    }


def dig(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def numbers(node: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Every number under ``node`` by dotted path, without the diagnostics (SPREAD_SKIP and
    the breakdowns)."""
    found: list[tuple[str, float]] = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            found.append((path, float(value)))
        elif isinstance(value, dict) and key not in SPREAD_SKIP and "_by_" not in key:
            found += numbers(value, path + ".")
    return found


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"throughput.steps_per_s": {"median", "min", "max", "all"}, ...}`` over the runs."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for path, value in numbers(run):
            values.setdefault(path, []).append(value)
    return {
        path: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
        for path, v in values.items()
    }


# -- history: W1 beside N finished steps -------------------------------------------------------

HISTORY_TARGET = 0.9  # history / empty steps/s
HISTORY_TABLES = (  # as in tests/history.py, with the schema pg_stat_user_tables names them by
    "tasker.tasks",
    "tasker.workflow_steps",
    "tasker.workflow_step_edges",
    "tasker.task_transitions",
    "tasker.workflow_step_transitions",
)


def run_history(
    key: str, args: argparse.Namespace, logdir: Path, workdir: Path, tag: str
) -> dict[str, Any]:
    """W1 throughput of one Tasker mode on an empty database and on one holding
    ``--history-steps`` finished steps (copies of a task its warm-up finished). Both databases
    have the same worker configuration, running for the whole comparison; the phases alternate
    E,H,H,E (``--history-rounds`` times), so a drift of the shared machine affects both alike."""
    from tests.history import clone_finished_task

    w1 = WORKLOADS["w1"]
    mode = key.removeprefix("tasker-")
    pair = {
        db: TaskerSystem(mode, args, logdir, workdir, variant=db) for db in ("empty", "history")
    }
    entry: dict[str, Any] = {"status": "ok", "history_steps": args.history_steps, "phases": []}
    try:
        for system in pair.values():
            system.setup()
            system.start_workers()
        # A warm-up as large as a phase: on tables analyzed with a handful of rows the planner
        # picks sequential scans that the growing "empty" tables make slower within a phase.
        warm = {}
        for db, system in pair.items():
            wait_until(system.ready, args.boot_timeout, f"{system.key} workers to be ready", 0.1)
            warm[db] = run_warmup(system, w1, args.workflows, f"{tag}-{db}", args.phase_timeout)
        history = pair["history"]
        print(f"[{key} history] cloning {args.history_steps:,} finished steps ...", flush=True)
        began = time.monotonic()
        entry["steps_added"] = clone_finished_task(
            history.conn, warm["history"][0], args.history_steps // w1.steps
        )
        entry["clone_seconds"] = round(time.monotonic() - began, 1)
        began = time.monotonic()
        history.vacuum()  # the visibility map, once, outside the phases
        entry["vacuum_seconds"] = round(time.monotonic() - began, 1)
        entry["database_mb"] = {
            db: system.conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            // 2**20
            for db, system in pair.items()
        }
        print(
            f"[{key} history] {entry['steps_added']:,} steps cloned in "
            f"{entry['clone_seconds']} s (incl. ANALYZE), VACUUM {entry['vacuum_seconds']} s; "
            f"database MB {entry['database_mb']}",
            flush=True,
        )
        if args.stats_delay > 0:
            entry["idle_db_rates_per_s"] = {
                db: system.measure_idle_rates(args.stats_delay) for db, system in pair.items()
            }
        order = ["empty", "history", "history", "empty"] * args.history_rounds
        for index, db in enumerate(order):
            tp = run_throughput(pair[db], w1, args.workflows, f"{tag}-{db}{index}", args)
            entry["phases"].append({"database": db, **tp})
            print(
                f"[{key} history] phase {index + 1}/{len(order)} {db}: "
                f"{tp['steps_per_s']:.0f} steps/s, CPU server "
                f"{tp['cpu_ms_per_step']['server']:.2f} ms/step",
                flush=True,
            )
        entry["summary"] = history_summary(entry["phases"])
    except Exception as exc:
        entry["status"] = "unavailable" if isinstance(exc, UnavailableError) else "error"
        entry["error"] = f"{exc.__class__.__name__}: {exc}"
        print(f"[{key} history] failed: {entry['error']}", flush=True)
    finally:
        for db, system in pair.items():
            entry.setdefault("worker_stop", {})[db] = system.stop_workers()
            entry.setdefault("worker_log_issues", {}).update(
                {w.label: log_issues(w.log) for w in system.workers}
            )
            system.close()
    return entry


def history_per_step(phase: dict[str, Any]) -> dict[str, float | None]:
    """What PostgreSQL did per step in one phase, from what run_throughput already collects."""
    db = phase.get("db_per_step") or {}

    def on_history(name: str) -> float | None:
        return sum(db[name].get(t, 0.0) for t in HISTORY_TABLES) if name in db else None

    return {
        "server_cpu_ms": phase["cpu_ms_per_step"]["server"],
        "worker_cpu_ms": phase["cpu_ms_per_step"]["worker"],
        "rows_returned": db.get("rows_returned"),
        "history_seq_scans": on_history("seq_scans_by_table"),
        "history_rows_seq_read": on_history("rows_seq_read_by_table"),
        "history_rows_idx_fetched": on_history("rows_idx_fetched_by_table"),
    }


def history_summary(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median steps/s of each database, their ratio, and the ratio of each history phase to
    the empty phase next to it (E,H | H,E): the spread a single pair would show."""
    rates = {
        db: [p["steps_per_s"] for p in phases if p["database"] == db] for db in ("empty", "history")
    }
    pairs = []
    for start in range(0, len(phases) - 3, 4):
        e1, h1, h2, e2 = (p["steps_per_s"] for p in phases[start : start + 4])
        pairs += [h1 / e1, h2 / e2]
    ratio = statistics.median(rates["history"]) / statistics.median(rates["empty"])
    per_step = {}
    for db in rates:
        rows = [history_per_step(p) for p in phases if p["database"] == db]
        per_step[db] = {
            name: statistics.median(values)
            if (values := [r[name] for r in rows if r[name] is not None])
            else None
            for name in rows[0]
        }
    return {
        "steps_per_s": {
            db: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
            for db, v in rates.items()
        },
        "ratio": ratio,
        "pair_ratios": pairs,
        "target": HISTORY_TARGET,
        "met": ratio >= HISTORY_TARGET,
        "share_of_cores_used": [p["share_of_cores_used"] for p in phases],
        "per_step_median": per_step,
    }


def render_history(key: str, entry: dict[str, Any], args: argparse.Namespace) -> str:
    title = f"{key}: W1 on an empty database vs beside {entry['history_steps']:,} finished steps"
    if entry["status"] != "ok":
        return f"{title}: {entry['status']}: {entry.get('error', '')}"
    header = [
        "phase",
        "database",
        "steps/s",
        "CPU srv",
        "CPU wrk",
        "cores",
        "rows ret",
        "hist seq scans",
        "hist seq rows",
        "hist idx rows",
    ]
    rows = [header]
    for index, phase in enumerate(entry["phases"], start=1):
        step = history_per_step(phase)
        rows.append(
            [
                str(index),
                phase["database"],
                fmt(phase["steps_per_s"]),
                fmt(step["server_cpu_ms"], 2),
                fmt(step["worker_cpu_ms"], 2),
                fmt(phase["share_of_cores_used"], 2),
                fmt(step["rows_returned"], 1),
                fmt(step["history_seq_scans"], 2),
                fmt(step["history_rows_seq_read"], 1),
                fmt(step["history_rows_idx_fetched"], 1),
            ]
        )
    summary = entry["summary"]
    rates = summary["steps_per_s"]
    verdict = "met" if summary["met"] else "NOT met"
    return "\n".join(
        [
            f"{title} ({args.workflows} workflows per phase; clone {entry['clone_seconds']} s). "
            "Per step: CPU in ms, rows from pg_stat_* ('hist' = the five history tables).",
            align(rows),
            f"history / empty steps/s: {summary['ratio']:.2f}x (medians "
            f"{rates['history']['median']:,.0f} vs {rates['empty']['median']:,.0f}; "
            f"empty {rates['empty']['min']:,.0f}-{rates['empty']['max']:,.0f}, history "
            f"{rates['history']['min']:,.0f}-{rates['history']['max']:,.0f}; adjacent pairs "
            + ", ".join(f"{r:.2f}x" for r in summary["pair_ratios"])
            + f"); target >= {HISTORY_TARGET}x: {verdict}",
        ]
    )


# -- machine information and report -------------------------------------------------------------


def machine(args: argparse.Namespace) -> dict[str, Any]:
    from bench.broker_throughput import machine_info

    info = machine_info()
    for name in EXTRA_PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["psutil_cpu_percent_1s_at_start"] = psutil.cpu_percent(interval=1.0)
    return info


def fsync_probe(results: dict[str, Any]) -> dict[str, Any]:
    from bench.broker_throughput import pg_test_fsync

    data_dir = None
    for entry in results.values():
        data_dir = data_dir or entry.get("service", {}).get("data_directory")
    return pg_test_fsync(data_dir)


#: the PostgreSQL settings recorded with a run: what a commit costs, and what else runs
PG_SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "commit_siblings",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
    "autovacuum",
    "max_connections",
    "data_directory",
)


def postgres_state(url: str) -> dict[str, Any]:
    """The version and settings of the PostgreSQL server that ``--database-url`` names."""
    import psycopg

    try:
        with psycopg.connect(
            with_database(url, "postgres"), autocommit=True, connect_timeout=5
        ) as conn:
            state = {"version": conn.execute("SELECT version()").fetchone()[0]}
            for name in PG_SETTINGS:
                state[name] = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
            return state
    except Exception as exc:
        return {"error": f"{exc.__class__.__name__}: {exc}"}


def machine_at_end(results: dict[str, Any]) -> dict[str, Any]:
    """The load and the commit after the run, and the RabbitMQ and Redis versions and settings
    the systems recorded at set-up."""
    from bench.broker_throughput import git_revision

    services: dict[str, Any] = {}
    for entry in results.values():
        for name, info in (entry.get("service") or {}).items():
            if name in ("rabbitmq", "redis") and isinstance(info, dict):
                services.setdefault(name, info)
    return {"loadavg_at_end": os.getloadavg(), "git_at_end": git_revision(), "services": services}


def metric(results: dict[str, Any], system: str, workload: str, path: tuple[str, ...]) -> Any:
    """A number of a system's workload: the median over the repetitions."""
    node: Any = results.get(system, {}).get("workloads", {}).get(workload)
    if not isinstance(node, dict):
        return None
    summary = node.get("summary", {}).get(".".join(path))
    return summary["median"] if summary else dig(node, path)


def cell(w: dict[str, Any], path: str, digits: int = 0, with_range: bool = False) -> str:
    """A table cell: the median over the repetitions, with ``(min-max)`` if asked and there
    was more than one."""
    values = w.get("summary", {}).get(path)
    if values is None:
        return fmt(dig(w, tuple(path.split("."))), digits)
    text = fmt(values["median"], digits)
    if with_range and len(values["all"]) > 1:
        text += f" ({fmt(values['min'], digits)}-{fmt(values['max'], digits)})"
    return text


def table_rows(results: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for system in args.systems:
        entry = results[system]
        if entry["status"] == "unavailable":
            rows.append([system, "-", "unavailable: " + entry.get("error", "")[:60]])
            continue
        for key in args.workloads:
            w = entry["workloads"].get(key)
            if w is None:
                rows.append([system, key, entry["status"]])
                continue
            rows.append(
                [
                    system,
                    key,
                    cell(w, "throughput.workflows_per_s", 1),
                    cell(w, "throughput.steps_per_s", with_range=True),
                    cell(w, "latency.e2e_ms.p50", 1),
                    cell(w, "latency.e2e_ms.p95", 1),
                    cell(w, "latency.handoff_ms.p50", 2),
                    cell(w, "latency.handoff_ms.p95", 2),
                    cell(w, "throughput.handoff_ms.p50", 1),
                    cell(w, "throughput.handoff_ms.p95", 1),
                    cell(w, "throughput.cpu_ms_per_step.worker", 2),
                    cell(w, "throughput.cpu_ms_per_step.server", 2),
                    cell(w, "throughput.cpu_ms_per_step.total", 2),
                    cell(w, "throughput.db_per_step.commits", 2),
                ]
            )
    return rows


def render_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    header = [
        "system",
        "wl",
        "wf/s",
        "steps/s",
        "e2e p50",
        "e2e p95",
        "hand p50",
        "hand p95",
        "burst hand p50",
        "burst hand p95",
        "CPU wrk",
        "CPU srv",
        "CPU tot",
        "commits",
    ]
    table = align([header, *table_rows(results, args)])
    if args.repeat == 1:
        return table
    return (
        f"Median of {args.repeat} interleaved repetitions; steps/s with (min-max). The JSON "
        "has the spread of every number (workloads.<w>.summary).\n" + table
    )


def lock_wait_line(tp: dict[str, Any]) -> str:
    """One line on the lock waits of a throughput phase."""
    locks = tp["lock_waits"]
    if locks.get("error"):
        return f"lock waits: sampler failed: {locks['error']}"
    events = ", ".join(f"{k} {v:.2f} s" for k, v in locks["lock_wait_seconds_by_event"].items())
    return (
        f"lock waits: {locks['lock_wait_seconds']:.2f} backend-s "
        f"({locks['lock_wait_ms_per_step']:.2f} ms/step, "
        f"{100 * (locks['lock_wait_share_of_busy'] or 0):.0f}% of busy backend time, "
        f"waiters in {100 * (locks['share_of_time_with_waiters'] or 0):.0f}% of the phase), "
        f"max {locks['max_waiters']} waiting of {locks['max_busy_backends']} busy; "
        f"{events or 'no Lock waits seen'} "
        f"({locks['samples']} samples, mean interval "
        f"{locks['mean_sample_interval_ms'] or 0:.1f} ms)"
    )


def render_shapes(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The wide and long shapes: throughput, e2e, the fan-in's handoff and lock waits."""
    keys = [k for k in args.workloads if k in SHAPES]
    if not keys:
        return ""
    header = [
        "system",
        "wl",
        "steps/s",
        "wall s",
        "e2e p50",
        "e2e max",
        "fan-out",
        "sibling spread",
        "fan-in",
        "fan-in seq",
        "lock wait s",
        "ms/step",
        "% busy",
        "max waiters",
        "by event (s)",
    ]
    rows = [header]
    missing = []
    for system in args.systems:
        entry = results[system]
        for key in keys:
            w = entry.get("workloads", {}).get(key)
            if w is None:
                missing.append(f"{system} {key}: {entry['status']}")
                continue
            tp, lat = w["throughput"], w["latency"]
            fan_tp, fan_lat = tp.get("fan_in_ms", {}), lat.get("fan_in_ms", {})
            locks = tp.get("lock_waits") or {}
            events = locks.get("lock_wait_seconds_by_event") or {}
            rows.append(
                [
                    system,
                    key,
                    fmt(tp["steps_per_s"]),
                    fmt(tp["wall_seconds"], 2),
                    fmt(lat["e2e_ms"].get("p50"), 0),
                    fmt(lat["e2e_ms"].get("max"), 0),
                    fmt(fan_tp.get("fan_out", {}).get("p50"), 1),
                    fmt(fan_tp.get("middle_spread", {}).get("p50"), 0),
                    fmt(fan_tp.get("fan_in", {}).get("max"), 1),
                    fmt(fan_lat.get("fan_in", {}).get("p50"), 1),
                    fmt(locks.get("lock_wait_seconds"), 2),
                    fmt(locks.get("lock_wait_ms_per_step"), 2),
                    fmt(100 * locks["lock_wait_share_of_busy"], 0)
                    if locks.get("lock_wait_share_of_busy") is not None
                    else "-",
                    str(locks["max_waiters"]) if "max_waiters" in locks else "-",
                    " ".join(f"{k.removeprefix('Lock:')}={v:.2f}" for k, v in events.items())
                    or ("none" if locks else "-"),
                ]
            )
    notes = [
        "Wide and long shapes (W4 fan-out 1->1,000->1, W5 chain of 200). Times in ms; "
        "throughput phase unless 'seq' (the sequential phase). 'fan-out' = first sibling "
        "start - root end (p50), 'sibling spread' = last - first sibling end (p50), 'fan-in' "
        "= join start - last sibling end (max), e2e from the sequential phase. Lock waits: "
        "Tasker's backends waiting on a heavyweight lock during the throughput phase, sampled "
        f"every {args.lock_sample_ms:g} ms (backend-seconds; '% busy' = of the non-idle "
        "backend time; 'by event' = tuple / transactionid row locks). Lock waits are measured "
        "for Tasker only (the peers keep no state in PostgreSQL).",
    ]
    if missing:
        notes.append("Not run: " + "; ".join(missing))
    return "\n".join([notes[0], align(rows), *notes[1:]])


def align(rows: list[list[str]]) -> str:
    """Rows as a text table, the first one the header."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


PEER_LABELS = {"dramatiq": "Dramatiq+RabbitMQ", "celery": "Celery+Redis", "dbos": "DBOS Transact"}
DBOS_TARGET = 4.0  # tasker-inline / DBOS steps/s, on each of W1, W2 and W3


def compute_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Tasker-inline against each peer (and Tasker-decoupled against each peer, for the JSON)."""
    ratios: dict[str, Any] = {}
    specs = {
        "w1_steps_per_s": ("w1", ("throughput", "steps_per_s"), False),
        "w2_steps_per_s": ("w2", ("throughput", "steps_per_s"), False),
        "w3_steps_per_s": ("w3", ("throughput", "steps_per_s"), False),
        "w4_steps_per_s": ("w4", ("throughput", "steps_per_s"), False),
        "w5_steps_per_s": ("w5", ("throughput", "steps_per_s"), False),
        "w1_handoff_p50_ms": ("w1", ("latency", "handoff_ms", "p50"), True),
        "w1_e2e_p50_ms": ("w1", ("latency", "e2e_ms", "p50"), True),
        "w1_cpu_ms_per_step": ("w1", ("throughput", "cpu_ms_per_step", "total"), True),
    }
    for ours in ("tasker-inline", "tasker-decoupled"):
        for peer in PEER_LABELS:
            pair: dict[str, Any] = {}
            for name, (workload, path, lower_is_better) in specs.items():
                a = metric(results, ours, workload, path)
                b = metric(results, peer, workload, path)
                pair[name] = {
                    ours: a,
                    peer: b,
                    "ratio": (a / b) if a is not None and b else None,
                    "lower_is_better": lower_is_better,
                }
            ratios[f"{ours}_vs_{peer}"] = pair
    return ratios


def render_ratios(ratios: dict[str, Any]) -> str:
    lines = ["Ratios (tasker-inline / peer; throughput: >1 is faster, handoff: <1 is faster):"]
    for peer, label in PEER_LABELS.items():
        pair = ratios.get(f"tasker-inline_vs_{peer}", {})
        parts = []
        names = ["w1_steps_per_s", "w2_steps_per_s", "w1_handoff_p50_ms"]
        if peer == "dbos":  # the durable peer: the target covers W1, W2 and W3
            names.insert(2, "w3_steps_per_s")
        for name in names:
            value = pair.get(name, {}).get("ratio")
            parts.append(f"{name} {'n/a' if value is None else f'{value:.2f}x'}")
        if peer == "dbos":
            met = [pair.get(n, {}).get("ratio") for n in names if n.endswith("_steps_per_s")]
            verdict = "n/a" if None in met else ("met" if min(met) >= DBOS_TARGET else "NOT met")
            parts.append(f"target >= {DBOS_TARGET:g}x on W1-W3 steps/s: {verdict}")
        lines.append(f"  vs {label}: " + ", ".join(parts))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of " + ",".join(SYSTEMS) + " (run in this order)",
    )
    parser.add_argument(
        "--workloads",
        default="w1,w2,w3",
        help="subset of w1..w5 (w4, w5: the wide and long shapes; see --shapes)",
    )
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="also run the wide and long shapes: w4 (fan-out 1->1,000->1) and w5 (chain of 200)",
    )
    parser.add_argument("--wide-workflows", type=int, default=2, help="W4 throughput workflows")
    parser.add_argument("--long-workflows", type=int, default=5, help="W5 throughput workflows")
    parser.add_argument(
        "--shape-latency-workflows", type=int, default=2, help="W4/W5 sequential workflows"
    )
    parser.add_argument(
        "--lock-sample",
        default="w4",
        help="workloads whose Tasker throughput phase samples lock waits (comma-separated; "
        "'' for none)",
    )
    parser.add_argument(
        "--lock-sample-ms", type=float, default=5.0, help="lock-wait sampling interval (ms)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="40/40/5 workflows, 10 sequential; no pg_test_fsync"
    )
    parser.add_argument("--workflows", type=int, default=200, help="W1/W2 throughput workflows")
    parser.add_argument("--fanout-workflows", type=int, default=10, help="W3 throughput workflows")
    parser.add_argument("--latency-workflows", type=int, default=30)
    parser.add_argument("--latency-gap-ms", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--celery-pool",
        choices=("threads", "prefork"),
        default="threads",
        help="threads: PROCESSES workers of --pool threads --concurrency THREADS; "
        "prefork: one worker with --concurrency PROCESSES*THREADS",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="base URL; each Tasker mode uses <dbname>_<mode>, dropped and re-created "
        "(the name must contain 'bench')",
    )
    parser.add_argument("--rabbitmq-url", default=DEFAULT_RABBITMQ_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--no-fsync-probe", action="store_true")
    parser.add_argument("--settle", type=float, default=1.0, help="pause before each phase (s)")
    parser.add_argument(
        "--stats-delay",
        type=float,
        default=None,
        help="Tasker: wait before and after a throughput phase before reading pg_stat_* "
        "counters (s); idle backends report statistics up to 10 s late (default 11; "
        "--quick: 0)",
    )
    parser.add_argument(
        "--history-steps",
        type=int,
        default=0,
        help="Tasker, W1: also compare throughput on an empty database with one holding this "
        "many finished steps (a multiple of 4; 0: off)",
    )
    parser.add_argument(
        "--history-rounds",
        type=int,
        default=3,
        help="rounds of E,H,H,E throughput phases of the history comparison (default 3)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of every system, interleaved (1 of each, then 2 of each ...); the tables "
        "and ratios use the median, the JSON has the spread (default 1)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the results JSON (default: RESULTS_DIR/workflows_<UTC timestamp>.json)",
    )
    parser.add_argument("--phase-timeout", type=float, default=300.0)
    parser.add_argument("--boot-timeout", type=float, default=90.0)
    parser.add_argument("--stop-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.quick:
        args.workflows, args.fanout_workflows, args.latency_workflows = 40, 5, 10
        args.no_fsync_probe = True
    if args.stats_delay is None:
        args.stats_delay = 0.0 if args.quick else 11.0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.shapes:
        args.workloads += [w for w in SHAPES if w not in args.workloads]
    if set(args.workloads) - set(WORKLOADS):
        parser.error("--workloads takes " + ", ".join(WORKLOADS))
    args.lock_sample = [w.strip() for w in args.lock_sample.split(",") if w.strip()]
    if set(args.lock_sample) - set(WORKLOADS) or args.lock_sample_ms <= 0:
        parser.error("--lock-sample takes workloads, --lock-sample-ms a positive number")
    args.throughput_workflows = {
        "w1": args.workflows,
        "w2": args.workflows,
        "w3": args.fanout_workflows,
        "w4": args.wide_workflows,
        "w5": args.long_workflows,
    }
    args.warmup = {"w1": 5, "w2": 5, "w3": 1, "w4": 1, "w5": 1}
    args.latency_counts = {k: args.latency_workflows for k in WORKLOADS}
    args.latency_counts.update({k: args.shape_latency_workflows for k in SHAPES})
    args.history_systems = [s for s in args.systems if s.startswith("tasker")]
    if args.history_steps:
        if args.history_steps < 0 or args.history_steps % WORKLOADS["w1"].steps:
            parser.error("--history-steps must be a positive multiple of 4 (W1's steps)")
        if not args.history_systems or "w1" not in args.workloads or args.history_rounds < 1:
            parser.error("--history-steps needs a tasker system, w1 and --history-rounds >= 1")
    for url, what in (
        (args.database_url, "--database-url"),
        (args.rabbitmq_url, "--rabbitmq-url"),
        (args.redis_url, "--redis-url"),
    ):
        require_local(url, what)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.output or args.results_dir / f"workflows_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    logdir = path.with_name(f"{path.stem}_logs")
    logdir.mkdir()
    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "argv": sys.argv,
        "config": {
            "systems": args.systems,
            "workloads": {k: WORKLOADS[k].title for k in args.workloads},
            "throughput_workflows": args.throughput_workflows,
            "latency_workflows": args.latency_workflows,
            "latency_workflows_by_workload": {k: args.latency_counts[k] for k in args.workloads},
            "lock_sample": {"workloads": args.lock_sample, "interval_ms": args.lock_sample_ms},
            "latency_gap_ms": args.latency_gap_ms,
            "warmup_workflows": args.warmup,
            "processes": args.processes,
            "threads": args.threads,
            "celery_pool": args.celery_pool,
            "history_steps": args.history_steps,
            "history_rounds": args.history_rounds,
            "repeat": args.repeat,
            "urls": {
                "database": redact(args.database_url),
                "rabbitmq": redact(args.rabbitmq_url),
                "redis": redact(args.redis_url),
            },
        },
        "machine": machine(args) | {"postgresql": postgres_state(args.database_url)},
    }
    results: dict[str, Any] = {}
    report["results"] = results
    with tempfile.TemporaryDirectory(prefix="tasker-wfbench-") as tmp:
        results.update(run_repetitions(args, logdir, Path(tmp), stamp))
        if args.history_steps:
            report["history"] = {
                key: run_history(key, args, logdir, Path(tmp), stamp)
                for key in args.history_systems
            }
    if not args.no_fsync_probe and any(k.startswith("tasker") for k in results):
        print("[machine] pg_test_fsync -s 1 ...", flush=True)
        report["machine"]["pg_test_fsync"] = fsync_probe(results)
    report["ratios"] = compute_ratios(results)
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
    report["machine"] |= machine_at_end(results)
    table = render_table(results, args)
    shapes_text = render_shapes(results, args)
    if shapes_text:
        table += "\n\n" + shapes_text
    ratio_text = render_ratios(report["ratios"])
    history_text = "\n\n".join(
        render_history(key, entry, args) for key, entry in report.get("history", {}).items()
    )
    report["table"] = [*table.splitlines(), "", *ratio_text.splitlines()]
    if history_text:
        report["table"] += ["", *history_text.splitlines()]
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(
        f"throughput: {args.workflows} workflows (W3: {args.fanout_workflows}"
        + (
            f"; W4: {args.wide_workflows}, W5: {args.long_workflows}"
            if set(SHAPES) & set(args.workloads)
            else ""
        )
        + f") submitted back to back; latency: {args.latency_workflows} one after another"
        + (f" (W4/W5: {args.shape_latency_workflows})" if set(SHAPES) & set(args.workloads) else "")
        + ". Times in ms, CPU in ms/step "
        "(throughput phase). 'hand' = handoff in the sequential phase, 'burst hand' = in the "
        "throughput phase."
    )
    print(table)
    print()
    print(ratio_text)
    if history_text:
        print()
        print(history_text)
    print(f"\nlogs: {logdir}\nresults: {path}")
    entries = [*results.values(), *report.get("history", {}).values()]
    return 0 if all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())

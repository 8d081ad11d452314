"""Dramatiq broker benchmark: Tasker's PGMQBroker against Dramatiq's RabbitMQ and Redis brokers.

Run from the repository root (services on 127.0.0.1 only)::

    .venv/bin/python bench/broker_throughput.py            # full run: 20,000 messages, 300 samples
    .venv/bin/python bench/broker_throughput.py --quick    # smoke run: 2,000 messages, 50 samples

For each broker, in one run and with the same worker (``dramatiq bench._bench_actors --processes 2
--threads 8``) and Dramatiq's default middleware:

1. **Throughput (drain).** Enqueue ``--messages`` no-op messages (PGMQ: ``enqueue_batch``; the
   others: ``send`` in a loop; both timed), then start the worker and time until every message was
   processed. Completions are counted from a fixed-width record each handler appends with one
   ``write()``; the queue depth is checked with the broker's own cheapest count once all are done.
2. **Enqueue-to-start latency.** With a fresh, idle worker, send ``--latency-samples`` messages one
   at a time, ``--latency-gap-ms`` apart, each carrying ``time.time_ns()`` taken just before the
   send; the handler records when it started.

Results: a table on stdout and ``bench/results/broker_<timestamp>.json`` (every number, machine and
service information, worker-log warnings). This is a benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench._common import (  # noqa: E402
    BenchError,
    fmt,
    log_issues,
    rabbitmq_channel,
    redact,
    require_local,
    wait_until,
)

DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
POLL_S = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_PROCESSES = {
    "pgmq": ("postgres",),
    "rabbitmq": ("beam.smp",),
    "redis": ("redis-server",),
}
PACKAGES = (
    "tasker",
    "dramatiq",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "pgmq",
    "pika",
    "redis",
    "msgspec",
)


# -- small helpers ------------------------------------------------------------------------------


def load_actors_module() -> ModuleType:
    """``bench._bench_actors``, imported the way the worker imports it."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("bench._bench_actors")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        only = values[0]
        return {
            "n": 1,
            "min": only,
            "p50": only,
            "p95": only,
            "p99": only,
            "max": only,
            "mean": only,
        }
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "min": min(values),
        "p50": cuts[49],
        "p95": cuts[94],
        "p99": cuts[98],
        "max": max(values),
        "mean": statistics.fmean(values),
    }


# -- /proc accounting ---------------------------------------------------------------------------


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (comm, ppid, utime+stime in clock ticks) for every visible process."""
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue
        left, right = text.find("("), text.rfind(")")
        rest = text[right + 2 :].split()
        cpu_ticks = int(rest[11]) + int(rest[12])  # utime + stime
        table[int(entry.name)] = (text[left + 1 : right], int(rest[1]), cpu_ticks)
    return table


def server_cpu_s(names: tuple[str, ...]) -> float:
    ticks = sum(cpu for comm, _, cpu in process_table().values() if comm in names)
    return ticks / CLOCK_TICKS


def descendants(root: int, table: dict[int, tuple[str, int, int]]) -> list[int]:
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (_, ppid, _) in table.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def tree_cpu_s(root: int) -> float:
    table = process_table()
    return sum(table[pid][2] for pid in descendants(root, table) if pid in table) / CLOCK_TICKS


# -- the worker subprocess ----------------------------------------------------------------------


class Worker:
    """``dramatiq bench._bench_actors`` as a subprocess; stopped with SIGTERM, by PID only."""

    def __init__(self, kind: str, args: argparse.Namespace, files: dict[str, Path], log: Path):
        self.kind = kind
        self.args = args
        self.files = files
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ns = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("dramatiq_")}
        env.update(
            BENCH_BROKER=self.kind,
            BENCH_DATABASE_URL=self.args.database_url,
            BENCH_RABBITMQ_URL=self.args.rabbitmq_url,
            BENCH_REDIS_URL=self.args.redis_url,
            BENCH_DONE_FILE=str(self.files["done"]),
            BENCH_LATENCY_FILE=str(self.files["latency"]),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> int:
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            "bench._bench_actors",
            "--processes",
            str(self.args.processes),
            "--threads",
            str(self.args.threads),
            "--path",
            str(REPO_ROOT),
        ]
        with open(self.log, "ab") as log:
            self.started_ns = time.time_ns()
            self.proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.started_ns

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"The {self.kind} worker exited early with code {self.proc.returncode}; "
                f"see {self.log}."
            )

    def ready_processes(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Worker process is ready for action")
        except OSError:
            return 0

    def stop(self, timeout_s: float) -> dict[str, Any]:
        """SIGTERM the main process, wait (bounded), then SIGKILL what is left, by PID."""
        if self.proc is None:
            return {}
        if self.proc.poll() is not None:
            return {"returncode": self.proc.returncode, "stop_s": 0.0, "killed": False}
        began = time.monotonic()
        family = descendants(self.proc.pid, process_table())
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
            for pid in reversed(family):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # children that outlived their parent (they should not): kill them by their PIDs
        table = process_table()
        for pid in family[1:]:
            if pid in table:
                killed = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return {
            "returncode": self.proc.returncode,
            "stop_s": round(time.monotonic() - began, 3),
            "killed": killed,
        }


# -- broker adapters ----------------------------------------------------------------------------


@dataclass
class Adapter:
    """What the driver needs to know about one broker besides Dramatiq's own API."""

    kind: str
    args: argparse.Namespace
    actors: ModuleType
    broker: Any = None
    noop: Any = None
    stamp: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def open_broker(self) -> None:
        self.broker = self.actors.make_broker(
            self.kind,
            database_url=self.args.database_url,
            rabbitmq_url=self.args.rabbitmq_url,
            redis_url=self.args.redis_url,
        )
        self.noop, self.stamp = self.actors.declare_actors(self.broker)

    def close_broker(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.close()
        self.broker = self.noop = self.stamp = None

    # overridden per broker
    def probe(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Once per run, before any phase."""

    def reset(self) -> None:
        """Empty the benchmark queue (and only it) before a phase."""
        raise NotImplementedError

    def depth(self) -> int:
        """Messages still in the queue (for RabbitMQ: ready ones; unacked are not counted)."""
        raise NotImplementedError

    def dead(self) -> int:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        return {}

    def cleanup(self) -> None:
        """At the end of the run."""

    def enqueue(self, count: int) -> dict[str, Any]:
        """Enqueue ``count`` no-op messages; plain ``send`` in a loop unless overridden."""
        began = time.perf_counter()
        for seq in range(count):
            self.noop.send(seq)
        elapsed = time.perf_counter() - began
        return {
            "method": "send loop",
            "seconds": elapsed,
            "msgs_per_s": count / elapsed,
            "single_send_msgs_per_s": count / elapsed,
            "single_send_sample": count,
        }


class PgmqAdapter(Adapter):
    def admin_url(self) -> str:
        return urlunsplit(urlsplit(self.args.database_url)._replace(path="/postgres"))

    def database_name(self) -> str:
        return urlsplit(self.args.database_url).path.lstrip("/")

    def connect(self, url: str | None = None) -> Any:
        import psycopg

        return psycopg.connect(
            url or self.args.database_url,
            autocommit=True,
            connect_timeout=5,
            application_name="tasker-bench-driver",
        )

    def probe(self) -> None:
        with self.connect(self.admin_url()) as conn:
            conn.execute("SELECT 1")

    def prepare(self) -> None:
        from psycopg import sql

        name = self.database_name()
        if not self.args.keep_database:
            if "bench" not in name:
                raise BenchError(
                    f"Refusing to drop database {name!r}: its name must contain 'bench' "
                    "(or pass --keep-database)."
                )
            with self.connect(self.admin_url()) as conn:
                ident = sql.Identifier(name)
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
                conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        from tasker.db.migrate import migrate, migration_status

        migrate(self.args.database_url)
        self.info = self.server_info()
        self.info["pgmq_installed_version"] = migration_status(self.args.database_url).pgmq

    def server_info(self) -> dict[str, Any]:
        settings = (
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "shared_buffers",
            "max_wal_size",
            "wal_level",
            "max_connections",
            "data_directory",
            "autovacuum",
        )
        info: dict[str, Any] = {}
        with self.connect() as conn:
            info["version"] = conn.execute("SELECT version()").fetchone()[0]
            for setting in settings:
                try:
                    info[setting] = conn.execute(f"SHOW {setting}").fetchone()[0]
                except Exception as exc:
                    info[setting] = f"unreadable: {exc.__class__.__name__}"
        return info

    def table(self, dead: bool = False) -> Any:
        names = self.broker_names()
        return names.dead_table if dead else names.table

    def broker_names(self) -> Any:
        from tasker.brokers.queue_names import map_queue_name

        return map_queue_name(self.actors.QUEUE, "tasker")

    def reset(self) -> None:
        from psycopg import sql

        self.broker.flush(self.actors.QUEUE)  # creates the queue on first use
        with self.connect() as conn:
            for dead in (False, True):
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(self.table(dead)))

    def _count(self, dead: bool) -> int:
        from psycopg import sql

        with self.connect() as conn:
            query = sql.SQL("SELECT count(*) FROM {}").format(self.table(dead))
            return int(conn.execute(query).fetchone()[0])

    def depth(self) -> int:
        return self._count(dead=False)

    def dead(self) -> int:
        return self._count(dead=True)

    def counters(self) -> dict[str, float]:
        with self.connect() as conn:
            commits = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()[0]
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        return {"xact_commit": float(commits), "wal_bytes": float(wal[0])}

    def enqueue(self, count: int) -> dict[str, Any]:
        single = min(self.args.single_send_sample, count)
        began = time.perf_counter()
        for seq in range(single):
            self.noop.send(seq)
        single_s = time.perf_counter() - began
        began = time.perf_counter()
        batch = self.args.batch_size
        for start in range(single, count, batch):
            messages = [self.noop.message(seq) for seq in range(start, min(start + batch, count))]
            self.broker.enqueue_batch(messages)
        batch_s = time.perf_counter() - began
        batched = count - single
        return {
            "method": f"enqueue_batch({batch})",
            "seconds": batch_s,
            "msgs_per_s": batched / batch_s if batched else None,
            "batched": batched,
            "single_send_msgs_per_s": single / single_s if single else None,
            "single_send_sample": single,
            "total_seconds": single_s + batch_s,
        }


class RedisAdapter(Adapter):
    def client(self) -> Any:
        import redis

        url = self.args.redis_url
        return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)

    def probe(self) -> None:
        self.client().ping()

    def prepare(self) -> None:
        client = self.client()
        server = client.info("server")
        info: dict[str, Any] = {"version": server.get("redis_version")}
        for key in ("appendonly", "appendfsync", "save"):
            try:
                info[key] = client.config_get(key).get(key)
            except Exception as exc:
                info[key] = f"unreadable: {exc.__class__.__name__}"
        self.info = info

    def reset(self) -> None:
        """Delete every key of the benchmark's own namespace (queues, acks, heartbeats)."""
        client = self.client()
        keys = list(client.scan_iter(match=f"{self.actors.REDIS_NAMESPACE}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])

    def depth(self) -> int:
        return int(self.client().hlen(f"{self.actors.REDIS_NAMESPACE}:{self.actors.QUEUE}.msgs"))

    def dead(self) -> int:
        return int(self.client().zcard(f"{self.actors.REDIS_NAMESPACE}:{self.actors.QUEUE}.XQ"))

    def cleanup(self) -> None:
        self.reset()


class RabbitmqAdapter(Adapter):
    def queue_names(self) -> tuple[str, str, str]:
        queue = self.actors.QUEUE
        return queue, f"{queue}.DQ", f"{queue}.XQ"

    def channel(self) -> Any:
        return rabbitmq_channel(self.args.rabbitmq_url)

    def probe(self) -> None:
        with self.channel() as channel:
            props = channel.connection._impl.server_properties  # pika keeps them on the impl
            version = props.get("version", b"")
            self.info = {"version": version.decode() if isinstance(version, bytes) else version}

    def reset(self) -> None:
        self.broker.get_queue_message_counts(self.actors.QUEUE)  # declares the three queues
        self.broker.flush(self.actors.QUEUE)

    def _ready(self, name: str) -> int:
        with self.channel() as channel:
            return int(channel.queue_declare(queue=name, passive=True).method.message_count)

    def depth(self) -> int:
        return self._ready(self.actors.QUEUE)

    def dead(self) -> int:
        return self._ready(self.queue_names()[2])

    def cleanup(self) -> None:
        with self.channel() as channel:
            for name in self.queue_names():
                channel.queue_delete(queue=name)


ADAPTERS: dict[str, type[Adapter]] = {
    "pgmq": PgmqAdapter,
    "rabbitmq": RabbitmqAdapter,
    "redis": RedisAdapter,
}


# -- phases -------------------------------------------------------------------------------------


def read_done(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    records = []
    for line in data.splitlines():
        seq, finished = line.split()
        records.append((int(seq), int(finished)))
    return records


@dataclass
class Phase:
    adapter: Adapter
    args: argparse.Namespace
    workdir: Path
    logdir: Path
    label: str

    def files(self) -> dict[str, Path]:
        files = {
            "done": self.workdir / f"{self.label}.done",
            "latency": self.workdir / f"{self.label}.latency",
        }
        for path in files.values():
            path.write_bytes(b"")
        return files

    def worker(self, files: dict[str, Path]) -> Worker:
        return Worker(self.adapter.kind, self.args, files, self.logdir / f"{self.label}.log")


def run_throughput(phase: Phase) -> dict[str, Any]:
    adapter, args, count = phase.adapter, phase.args, phase.args.messages
    server_names = SERVER_PROCESSES[adapter.kind]
    adapter.open_broker()
    try:
        adapter.reset()
        enqueue = adapter.enqueue(count)
    finally:
        adapter.close_broker()
    depth_before = adapter.depth()
    if depth_before != count:
        raise BenchError(
            f"Expected {count} messages in the queue after enqueue, found {depth_before}."
        )
    files = phase.files()
    worker = phase.worker(files)
    counters_before = adapter.counters()
    server_before = server_cpu_s(server_names)
    started_ns = worker.start()
    try:
        first, done_ns = wait_for_drain(worker, files["done"], count, args.drain_timeout)
        worker_cpu_end = tree_cpu_s(worker.pid)
        server_end = server_cpu_s(server_names)
        wait_until(lambda: adapter.depth() == 0, 30, "the queue depth to reach 0")
        empty_ns = time.time_ns()
    finally:
        stop = worker.stop(args.stop_timeout)
    counters_after = adapter.counters()
    records = read_done(files["done"])
    finished = sorted(ns for _, ns in records)
    seqs = [seq for seq, _ in records]
    first_ns, last_ns = finished[0], finished[-1]
    drain_s = (last_ns - started_ns) / 1e9
    steady_s = (last_ns - first_ns) / 1e9
    steady_count = count - first["done"]
    result: dict[str, Any] = {
        "messages": count,
        "enqueue": enqueue,
        "drain_seconds": drain_s,
        "msgs_per_s": count / drain_s,
        "boot_seconds": (first_ns - started_ns) / 1e9,
        "steady_seconds": steady_s,
        "steady_msgs_per_s": (count - 1) / steady_s if steady_s > 0 else None,
        "detected_done_seconds": (done_ns - started_ns) / 1e9,
        "queue_empty_observed_seconds": (empty_ns - started_ns) / 1e9,
        "completions_recorded": len(records),
        "duplicate_executions": len(seqs) - len(set(seqs)),
        "missing": count - len(set(seqs)),
        "dead_letters": adapter.dead(),
        "worker_cpu_seconds_incl_boot": worker_cpu_end,
        "server_cpu_seconds": server_end - server_before,
        "server_processes": list(server_names),
        "worker_stop": stop,
        "worker_log": str(worker.log),
        "worker_log_issues": log_issues(worker.log),
    }
    if steady_count > 0:
        result["cpu_ms_per_msg_steady"] = {
            "worker": 1000 * (worker_cpu_end - first["worker_cpu"]) / steady_count,
            "server": 1000 * (server_end - first["server_cpu"]) / steady_count,
            "messages_in_window": steady_count,
        }
    if counters_before and counters_after:
        result["db_per_msg"] = {
            "commits": (counters_after["xact_commit"] - counters_before["xact_commit"]) / count,
            "wal_bytes": (counters_after["wal_bytes"] - counters_before["wal_bytes"]) / count,
            "note": "drain phase incl. worker boot/shutdown; WAL is cluster-wide",
        }
    return result


def wait_for_drain(
    worker: Worker, path: Path, count: int, timeout_s: float
) -> tuple[dict[str, Any], int]:
    """Poll the completion file every 50 ms until every message has run once.

    Returns CPU readings taken when the first completion was seen (for a steady-state CPU/msg
    figure that excludes the worker's boot) and the time all completions were seen.
    """
    length = load_actors_module().DONE_RECORD_LEN
    deadline = time.monotonic() + timeout_s
    first: dict[str, Any] | None = None
    server_names = SERVER_PROCESSES[worker.kind]
    while True:
        done = path.stat().st_size // length
        if first is None and done > 0:
            first = {
                "done": done,
                "worker_cpu": tree_cpu_s(worker.pid),
                "server_cpu": server_cpu_s(server_names),
            }
        if done >= count and len({seq for seq, _ in read_done(path)}) >= count:
            assert first is not None
            return first, time.time_ns()
        worker.check_alive()
        if time.monotonic() >= deadline:
            raise BenchError(f"Drain timed out after {timeout_s:.0f} s with {done}/{count} done.")
        time.sleep(POLL_S)


def read_latency(path: Path) -> dict[int, tuple[int, int]]:
    samples: dict[int, tuple[int, int]] = {}
    for line in path.read_bytes().splitlines():
        seq, sent, started = (int(part) for part in line.split())
        samples.setdefault(seq, (sent, started))
    return samples


def run_latency(phase: Phase) -> dict[str, Any]:
    adapter, args = phase.adapter, phase.args
    samples = args.latency_samples
    files = phase.files()
    worker = phase.worker(files)
    adapter.open_broker()
    try:
        adapter.reset()
        worker.start()
        wait_until(
            lambda: worker.check_alive() or worker.ready_processes() >= args.processes,
            args.boot_timeout,
            "every worker process to be ready",
        )
        warmups = list(range(-1, -args.warmup - 1, -1))
        for seq in warmups:
            adapter.stamp.send(seq, time.time_ns())
            time.sleep(args.latency_gap_ms / 1000)
        wait_until(
            lambda: set(warmups) <= set(read_latency(files["latency"])), 30, "the warm-up messages"
        )
        time.sleep(0.5)
        send_call_ms = []
        for seq in range(samples):
            sent_ns = time.time_ns()
            adapter.stamp.send(seq, sent_ns)
            send_call_ms.append((time.time_ns() - sent_ns) / 1e6)
            time.sleep(args.latency_gap_ms / 1000)
        wait_until(
            lambda: len([s for s in read_latency(files["latency"]) if s >= 0]) >= samples,
            30,
            "every latency sample to be processed",
        )
    finally:
        stop = worker.stop(args.stop_timeout)
        adapter.close_broker()
    measured = read_latency(files["latency"])
    latencies = [(start - sent) / 1e6 for seq, (sent, start) in measured.items() if seq >= 0]
    return {
        "samples": samples,
        "gap_ms": args.latency_gap_ms,
        "enqueue_to_start_ms": percentiles(latencies),
        "send_call_ms": percentiles(send_call_ms),
        "worker_stop": stop,
        "worker_log": str(worker.log),
        "worker_log_issues": log_issues(worker.log),
    }


def summarize_throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def enqueue_median(key: str) -> float | None:
        values = [r["enqueue"][key] for r in runs if r["enqueue"].get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "runs": len(runs),
        "msgs_per_s": median("msgs_per_s"),
        "msgs_per_s_all": [r["msgs_per_s"] for r in runs],
        "steady_msgs_per_s": median("steady_msgs_per_s"),
        "boot_seconds": median("boot_seconds"),
        "enqueue_method": runs[0]["enqueue"]["method"],
        "enqueue_msgs_per_s": enqueue_median("msgs_per_s"),
        "single_send_msgs_per_s": enqueue_median("single_send_msgs_per_s"),
    }


# -- machine information -------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def git_revision() -> dict[str, Any]:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"head": head or None, "dirty": bool(dirty.strip())}


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": first_line_with("/proc/cpuinfo", "model name"),
        "mem_total": first_line_with("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "packages": package_versions(),
        "git": git_revision(),
    }


def find_pg_test_fsync() -> str | None:
    found = shutil.which("pg_test_fsync")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_test_fsync"), reverse=True)
    return str(candidates[0]) if candidates else None


def pg_test_fsync(data_directory: str | None) -> dict[str, Any]:
    """``pg_test_fsync -s 1`` on a temporary file (B9.1 asks for it with every run)."""
    binary = find_pg_test_fsync()
    if binary is None:
        return {"skipped": "pg_test_fsync not found"}
    with tempfile.TemporaryDirectory(prefix="tasker-bench-fsync-") as tmp:
        target = Path(tmp) / "fsync.test"
        try:
            out = subprocess.run(
                [binary, "-s", "1", "-f", str(target)],
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"skipped": "pg_test_fsync timed out"}
        same_device = None
        if data_directory:
            with contextlib.suppress(OSError):
                same_device = os.stat(tmp).st_dev == os.stat(data_directory).st_dev
    match = re.search(r"^\s*fdatasync\s+([\d.]+) ops/sec\s+(\d+) usecs/op", out.stdout, re.M)
    return {
        "fdatasync_ops_per_s": float(match.group(1)) if match else None,
        "fdatasync_usecs_per_op": int(match.group(2)) if match else None,
        "test_file_on_pg_data_device": same_device,
        "output": out.stdout.strip().splitlines(),
    }


# -- report ---------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def table_rows(results: dict[str, Any], brokers: list[str]) -> list[list[str]]:
    def rate(kind: str) -> float | None:
        entry = results.get(kind, {})
        return entry.get("throughput_summary", {}).get("msgs_per_s")

    rows = []
    for kind in brokers:
        entry = results[kind]
        if entry["status"] != "ok":
            rows.append([kind, entry["status"]] + [""] * 9)
            continue
        summary = entry["throughput_summary"]
        latency = entry["latency"]["enqueue_to_start_ms"]
        enqueue_label = f"{fmt(summary['enqueue_msgs_per_s'])} ({summary['enqueue_method']})"
        rows.append(
            [
                kind,
                fmt(summary["msgs_per_s"]),
                ratio(summary["msgs_per_s"], rate("redis")),
                ratio(summary["msgs_per_s"], rate("rabbitmq")),
                fmt(summary["steady_msgs_per_s"]),
                enqueue_label,
                fmt(summary["single_send_msgs_per_s"]),
                fmt(latency.get("p50"), 2),
                fmt(latency.get("p95"), 2),
                fmt(latency.get("p99"), 2),
                fmt(entry["throughput"][-1].get("cpu_ms_per_msg_steady", {}).get("server"), 3),
            ]
        )
    return rows


def render_table(results: dict[str, Any], brokers: list[str]) -> str:
    header = [
        "broker",
        "msgs/s",
        "vs redis",
        "vs rabbitmq",
        "steady msgs/s",
        "enqueue msgs/s",
        "send() msgs/s",
        "lat p50 ms",
        "lat p95 ms",
        "lat p99 ms",
        "server CPU ms/msg",
    ]
    rows = [header, *table_rows(results, brokers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * width for width in widths))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    actors = load_actors_module()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument(
        "--brokers",
        default="pgmq,rabbitmq,redis",
        help="comma-separated subset of pgmq,rabbitmq,redis (run in this order)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2,000 messages, 50 latency samples, no pg_test_fsync",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="throughput runs per broker, interleaved; the median is reported",
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1000, help="PGMQ enqueue_batch size")
    parser.add_argument(
        "--single-send-sample",
        type=int,
        default=1000,
        help="PGMQ: this many of the messages are sent one by one (timed apart)",
    )
    parser.add_argument("--latency-gap-ms", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=5, help="latency warm-up messages")
    parser.add_argument(
        "--database-url",
        default=actors.DEFAULT_DATABASE_URL,
        help="benchmark database: dropped and re-created (name must contain "
        "'bench') unless --keep-database",
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--rabbitmq-url", default=actors.DEFAULT_RABBITMQ_URL)
    parser.add_argument("--redis-url", default=actors.DEFAULT_REDIS_URL)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the results JSON (default: RESULTS_DIR/broker_<UTC timestamp>.json)",
    )
    parser.add_argument("--no-fsync-probe", action="store_true", help="skip pg_test_fsync")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--boot-timeout", type=float, default=60.0)
    parser.add_argument("--stop-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.latency_samples, args.no_fsync_probe = 2000, 50, True
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(args.brokers) - set(ADAPTERS)
    if unknown:
        parser.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    if args.messages < 2 or args.latency_samples < 1 or args.repeat < 1:
        parser.error("--messages must be >= 2, --latency-samples and --repeat >= 1")
    require_local(args.database_url, "--database-url")
    require_local(args.rabbitmq_url, "--rabbitmq-url")
    require_local(args.redis_url, "--redis-url")
    return args


def prepare_adapters(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Adapter]:
    actors = load_actors_module()
    ready: dict[str, Adapter] = {}
    for kind in args.brokers:
        adapter = ADAPTERS[kind](kind, args, actors)
        try:
            adapter.probe()
        except Exception as exc:
            results[kind] = {"status": "unavailable", "error": f"{exc.__class__.__name__}: {exc}"}
            print(f"[{kind}] unavailable: {exc}", flush=True)
            continue
        try:
            adapter.prepare()
        except Exception as exc:
            results[kind] = {"status": "error", "error": f"{exc.__class__.__name__}: {exc}"}
            print(f"[{kind}] set-up failed: {exc}", flush=True)
            continue
        results[kind] = {"status": "ok", "service": adapter.info, "throughput": []}
        ready[kind] = adapter
    return ready


def fail(results: dict[str, Any], kind: str, where: str, exc: Exception) -> None:
    results[kind]["status"] = "error"
    results[kind]["error"] = f"{where}: {exc.__class__.__name__}: {exc}"
    print(f"[{kind}] {where} failed: {exc}", flush=True)


def run_all(
    args: argparse.Namespace,
    adapters: dict[str, Adapter],
    results: dict[str, Any],
    workdir: Path,
    logdir: Path,
) -> None:
    for rep in range(args.repeat):
        for kind, adapter in adapters.items():
            if results[kind]["status"] != "ok":
                continue
            print(
                f"[{kind}] throughput run {rep + 1}/{args.repeat}: {args.messages} messages",
                flush=True,
            )
            phase = Phase(adapter, args, workdir, logdir, f"{kind}-throughput-{rep + 1}")
            try:
                run = run_throughput(phase)
            except Exception as exc:
                fail(results, kind, "throughput", exc)
                continue
            results[kind]["throughput"].append(run)
            print(
                f"[{kind}]   {run['msgs_per_s']:,.0f} msgs/s (steady "
                f"{run['steady_msgs_per_s'] or 0:,.0f}), enqueue "
                f"{run['enqueue']['msgs_per_s'] or 0:,.0f} msgs/s",
                flush=True,
            )
            time.sleep(1)
    for kind in adapters:
        if results[kind]["throughput"]:
            results[kind]["throughput_summary"] = summarize_throughput(results[kind]["throughput"])
    for kind, adapter in adapters.items():
        if results[kind]["status"] != "ok":
            continue
        print(f"[{kind}] latency: {args.latency_samples} samples", flush=True)
        try:
            latency = run_latency(Phase(adapter, args, workdir, logdir, f"{kind}-latency"))
        except Exception as exc:
            fail(results, kind, "latency", exc)
            continue
        results[kind]["latency"] = latency
        pct = latency["enqueue_to_start_ms"]
        print(
            f"[{kind}]   p50 {pct['p50']:.2f} ms, p95 {pct['p95']:.2f} ms, p99 {pct['p99']:.2f} ms",
            flush=True,
        )
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.output or args.results_dir / f"broker_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    logdir = path.with_name(f"{path.stem}_logs")
    logdir.mkdir()
    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "argv": sys.argv,
        "config": {
            "messages": args.messages,
            "latency_samples": args.latency_samples,
            "latency_gap_ms": args.latency_gap_ms,
            "repeat": args.repeat,
            "brokers": args.brokers,
            "worker": f"dramatiq bench._bench_actors --processes {args.processes} "
            f"--threads {args.threads}",
            "pgmq_batch_size": args.batch_size,
            "pgmq_single_send_sample": args.single_send_sample,
            "urls": {
                "database": redact(args.database_url),
                "rabbitmq": redact(args.rabbitmq_url),
                "redis": redact(args.redis_url),
            },
            "queue": load_actors_module().QUEUE,
        },
        "machine": machine_info(),
    }
    results: dict[str, Any] = {}
    report["results"] = results
    adapters = prepare_adapters(args, results)
    if "pgmq" in adapters and not args.no_fsync_probe:
        print("[machine] pg_test_fsync -s 1 ...", flush=True)
        report["machine"]["pg_test_fsync"] = pg_test_fsync(
            results["pgmq"]["service"].get("data_directory")
        )
    with tempfile.TemporaryDirectory(prefix="tasker-bench-") as tmp:
        try:
            run_all(args, adapters, results, Path(tmp), logdir)
        finally:
            for kind, adapter in adapters.items():
                try:
                    adapter.cleanup()
                except Exception as exc:
                    print(f"[{kind}] cleanup failed: {exc}", flush=True)
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
    table = render_table(results, args.brokers)
    report["table"] = table.splitlines()
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(
        f"{args.messages:,} no-op messages; worker {report['config']['worker']}; "
        "msgs/s = messages / (worker start -> last completion)"
    )
    print(table)
    issues = {
        kind: entry.get("latency", {}).get("worker_log_issues", {}).get("count", 0)
        + sum(r["worker_log_issues"]["count"] for r in entry.get("throughput", []))
        for kind, entry in results.items()
    }
    print(f"\nworker-log warnings/errors: {issues}  (logs: {logdir})")
    print(f"results: {path}")
    return 0 if all(entry["status"] == "ok" for entry in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

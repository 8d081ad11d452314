"""HTTP API benchmark: ``POST /v1/tasks`` through ``tasker serve`` against ``tasker.Client.submit``
in-process, and ``GET /v1/tasks?state=...`` over a million tasks.

Run from the repository root (PostgreSQL on 127.0.0.1)::

    .venv/bin/python bench/api_bench.py --quick      # smoke: 5 s, 10 clients, 50,000 tasks
    .venv/bin/python bench/api_bench.py              # full: 30 s, 50 clients, 1,000,000 tasks

One run, one database (dropped, re-created and migrated; its name must contain ``bench``):

1. **Load.** ``--tasks`` tasks are inserted with one set-based INSERT (the statement of
   ``tests/test_task_listing.py``'s plan test: 90 % complete, 1 % error, 2 % cancelled, 3 %
   steps_in_process, 2 % pending, ...; half of its waiting_for_retry tasks are then made
   blocked_by_failures), the tasks indexes rebuilt after it, then VACUUM ANALYZE. A template of
   two no-op steps is registered. No worker runs: new tasks stay queued.
2. **Create.** One ``tasker serve`` process (``--port 0``, its own process group,
   ``TASKER_API__MAX_QUEUE_DEPTH=0`` so that backpressure never refuses a task) takes
   ``POST /v1/tasks`` from ``--clients`` keep-alive HTTP clients, and ``tasker.Client.submit``
   runs from as many threads in this process, with the same settings and template. After a
   warm-up of each, the two alternate A-B-B-A, ``--seconds``/2 per segment, so that both see
   the same growing tables and queue. Closed loop: each client sends its next request when the
   previous one answered.
3. **List.** ``GET /v1/tasks?state=S&limit=50`` for each state of ``--get-states``:
   ``--get-requests`` requests one after another, then as many from ``--get-clients`` clients;
   and ``tasker.Client.list_tasks`` in-process, for the share of the time HTTP adds. Target:
   p99 <= 50 ms.

The API process's RSS is read after each phase; CPU (``/proc`` via psutil) of the load
generator (this process), the API process and PostgreSQL is recorded per segment.

Results: tables on stdout and ``bench/results/api_<timestamp>.json``. This is a benchmark, not
a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench import workflow_bench as wb  # noqa: E402
from bench._common import (  # noqa: E402
    BenchError,
    fmt,
    log_issues,
    redact,
    require_local,
    wait_until,
)
from bench.broker_throughput import machine_info, percentiles, pg_test_fsync  # noqa: E402

DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_DATABASE_URL = "postgresql://root@127.0.0.1:5432/tasker_api_bench"
NAMESPACE = "apibench"
WORKFLOW = "two_noops"
VERSION = "1.0.0"
DEFAULT_GET_STATES = "complete,error,blocked_by_failures,steps_in_process,resolved_manually"
GET_TARGET_P99_MS = 50.0
GET_WARMUP = 10
EXTRA_PACKAGES = ("httpx", "litestar", "uvicorn", "anyio", "psutil", "psycopg-pool")
PG_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "max_wal_size",
    "autovacuum",
    "max_connections",
    "data_directory",
)
# the INSERT of tests/test_task_listing.py makes this many tasks; --tasks changes the bound
MILLION_SERIES = "generate_series(0::bigint, 999999)"
SERVE_LINE = re.compile(r"tasker api \S+ \(\S+\): http://127\.0\.0\.1:(\d+)")


# -- small helpers -------------------------------------------------------------------------------


def connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(
        url, autocommit=True, connect_timeout=5, application_name="tasker-apibench-driver"
    )


def recreate_database(url: str) -> None:
    """DROP (WITH FORCE), CREATE and migrate the benchmark database."""
    from psycopg import sql

    from tasker.db.migrate import migrate

    name = urlsplit(url).path.lstrip("/")
    if "bench" not in name:
        raise SystemExit(f"Refusing to drop database {name!r}: its name must contain 'bench'.")
    with connect(wb.with_database(url, "postgres")) as admin:
        ident = sql.Identifier(name)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    migrate(url)


def drop_database(url: str) -> None:
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    if "bench" not in name:
        return
    with connect(wb.with_database(url, "postgres")) as admin:
        ident = sql.Identifier(name)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def server_info(conn: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"version": conn.execute("SELECT version()").fetchone()[0]}
    for setting in PG_SETTINGS:
        info[setting] = conn.execute(f"SHOW {setting}").fetchone()[0]
    return info


def tasker_env(args: argparse.Namespace) -> dict[str, str]:
    """The TASKER_* settings of the API process, which the in-process Client uses too."""
    env = {"TASKER_DATABASE__URL": args.database_url, "TASKER_API__MAX_QUEUE_DEPTH": "0"}
    if args.api_threads is not None:
        env["TASKER_API__THREADS"] = str(args.api_threads)
    if args.pool_max_size is not None:
        env["TASKER_DATABASE__POOL_MAX_SIZE"] = str(args.pool_max_size)
    return env


def load_tasker_settings(env: dict[str, str]) -> Any:
    """``tasker.settings.load_settings()`` as the API process reads it (same TASKER_* only)."""
    from tasker.settings import load_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("TASKER_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def own_cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def memory_of(pid: int) -> dict[str, float | None]:
    """RSS now and its peak (VmHWM), in MiB."""
    result: dict[str, float | None] = {"rss_mib": None, "peak_rss_mib": None}
    with contextlib.suppress(psutil.Error):
        result["rss_mib"] = psutil.Process(pid).memory_info().rss / 2**20
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                result["peak_rss_mib"] = int(line.split()[1]) / 1024
    return result


def rounded(stats: dict[str, float], digits: int = 3) -> dict[str, float]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in stats.items()}


def render(header: list[str], rows: list[list[str]]) -> str:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# -- 1. load -------------------------------------------------------------------------------------


def load_tasks(conn: Any, count: int) -> dict[str, Any]:
    """``count`` tasks with the set-based INSERT of the listing plan test, indexes rebuilt after,
    half of waiting_for_retry made blocked_by_failures, then VACUUM ANALYZE."""
    from tests.history import secondary_task_indexes
    from tests.test_task_listing import MILLION

    if MILLION_SERIES not in MILLION:
        raise BenchError(f"tests/test_task_listing.py's MILLION no longer has {MILLION_SERIES!r}")
    statement = MILLION.replace(MILLION_SERIES, f"generate_series(0::bigint, {count - 1})")
    timings: dict[str, float] = {}
    began = time.monotonic()
    indexes = secondary_task_indexes(conn)
    conn.execute("SET maintenance_work_mem = '256MB'")
    conn.execute(statement)
    timings["insert_s"] = time.monotonic() - began
    mark = time.monotonic()
    conn.execute(
        "UPDATE tasker.tasks SET state = 'blocked_by_failures' "
        "WHERE state = 'waiting_for_retry' AND hashtext(identity_hash) & 1 = 0"
    )
    timings["update_s"] = time.monotonic() - mark
    mark = time.monotonic()
    for _, definition in indexes:
        conn.execute(definition)
    timings["indexes_s"] = time.monotonic() - mark
    mark = time.monotonic()
    conn.execute("VACUUM ANALYZE")
    conn.execute("RESET maintenance_work_mem")
    timings["vacuum_analyze_s"] = time.monotonic() - mark
    timings["total_s"] = time.monotonic() - began
    states = dict(
        conn.execute(
            "SELECT state, count(*) FROM tasker.tasks GROUP BY state ORDER BY count(*) DESC"
        ).fetchall()
    )
    size = conn.execute(
        "SELECT pg_size_pretty(pg_table_size('tasker.tasks')), "
        "pg_size_pretty(pg_indexes_size('tasker.tasks'))"
    ).fetchone()
    return {
        "tasks": count,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "by_state": states,
        "table_size": size[0],
        "indexes_size": size[1],
        "indexes_rebuilt": [name for name, _ in indexes],
        "method": "tests/test_task_listing.py MILLION (one INSERT ... SELECT generate_series), "
        "non-constraint indexes of tasker.tasks dropped before and re-created after; "
        "half of waiting_for_retry set to blocked_by_failures; VACUUM ANALYZE",
    }


def noop(ctx: Any) -> None:
    """The template's steps (never run: no worker)."""


def register_template(client: Any) -> dict[str, Any]:
    import tasker
    from tasker.workflow.definition import StepDefinition

    flow = tasker.Workflow(
        NAMESPACE,
        WORKFLOW,
        version=VERSION,
        description="api benchmark: two no-op steps",
        identity_strategy="always_unique",
        register=False,
    )
    flow.add_step(StepDefinition(name="first", handler_path=f"{__name__}:noop", handler=noop))
    flow.add_step(
        StepDefinition(
            name="second", handler_path=f"{__name__}:noop", depends_on=("first",), handler=noop
        )
    )
    client.register(flow)
    return {"namespace": NAMESPACE, "name": WORKFLOW, "version": VERSION, "steps": 2}


def seed(client: Any, conn: Any, count: int) -> dict[str, Any]:
    """``count`` tasks of the template through ``client`` (8 threads), then VACUUM ANALYZE.

    The SQL load writes tasks only: without this, the step, edge and transition tables are
    empty when analyzed, and the plans PL/pgSQL and the foreign-key checks cache on each pooled
    connection may scan them sequentially; with autovacuum off nothing re-plans them, so each
    create costs more as the tables grow, and whichever path connects first is penalized most.
    """
    from concurrent.futures import ThreadPoolExecutor

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.submit(NAMESPACE, WORKFLOW, {"seed": i}), range(count)))
    submitted = time.monotonic() - began
    mark = time.monotonic()
    conn.execute("VACUUM ANALYZE")
    return {
        "tasks": count,
        "submit_s": round(submitted, 2),
        "vacuum_analyze_s": round(time.monotonic() - mark, 2),
    }


# -- the API process ------------------------------------------------------------------------------


class ApiServer:
    """``python -m tasker.cli serve --port 0`` in its own session; stopped by its PID only."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        command = [sys.executable, "-m", "tasker.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", "0"]
        self.worker = wb.Worker("api", command, wb.clean_env() | env, log)
        self.base_url = ""

    @property
    def pid(self) -> int:
        return self.worker.pid

    def start(self, timeout_s: float) -> float:
        began = time.monotonic()
        self.worker.start()

        def port_printed() -> bool:
            self.worker.check_alive()
            match = SERVE_LINE.search(self.worker.log.read_text(errors="replace"))
            if match:
                self.base_url = f"http://127.0.0.1:{match.group(1)}"
            return bool(match)

        wait_until(port_printed, timeout_s, "tasker serve to print its port")
        with httpx.Client(base_url=self.base_url, timeout=2, trust_env=False) as probe:

            def live() -> bool:
                self.worker.check_alive()
                try:
                    return probe.get("/health/live").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(live, max(timeout_s - (time.monotonic() - began), 1), "/health/live")
        return time.monotonic() - began

    def cpu(self) -> float:
        return wb.tree_cpu([self.pid])

    def memory(self) -> dict[str, float | None]:
        return memory_of(self.pid)

    def stop(self, timeout_s: float) -> dict[str, Any]:
        return self.worker.stop(timeout_s)


# -- 2. create: HTTP and Client load -------------------------------------------------------------


class Tally:
    """What the load of one segment did: latencies of successes, failures by status/class."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def merge(self, latencies: list[float], statuses: Counter[str], errors: Counter[str]) -> None:
        with self.lock:
            self.latencies.extend(latencies)
            self.statuses.update(statuses)
            self.errors.update(errors)


def body(client: int, number: int, tag: str) -> bytes:
    context = {"client": client, "n": number, "segment": tag, "order": f"o-{client}-{number}"}
    return json.dumps({"namespace": NAMESPACE, "name": WORKFLOW, "context": context}).encode()


def http_threads(base_url: str, clients: int, seconds: float, tag: str, timeout: float) -> Tally:
    """``clients`` threads, each with its own keep-alive httpx.Client (one connection)."""
    tally = Tally()
    headers = {"content-type": "application/json"}

    def run(index: int, ready: Callable[[], None], running: Callable[[], bool]) -> None:
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(
            base_url=base_url, timeout=timeout, limits=limits, trust_env=False
        ) as http:
            ready()
            for number in itertools.count():
                if not running():
                    break
                payload = body(index, number, tag)
                began = time.perf_counter()
                try:
                    response = http.post("/v1/tasks", content=payload, headers=headers)
                except httpx.HTTPError as exc:
                    errors[exc.__class__.__name__] += 1
                    continue
                elapsed = time.perf_counter() - began
                statuses[str(response.status_code)] += 1
                if response.status_code == 201:
                    latencies.append(elapsed * 1000)
        tally.merge(latencies, statuses, errors)

    in_threads(clients, seconds, timeout, run)
    return tally


def http_asyncio(base_url: str, clients: int, seconds: float, tag: str, timeout: float) -> Tally:
    """``clients`` coroutines on one event loop, each with its own keep-alive
    httpx.AsyncClient (one connection; a shared pool of many connections costs far more CPU)."""
    tally = Tally()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def run(index: int, deadline: float) -> None:
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        async with httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, trust_env=False
        ) as http:
            for number in itertools.count():
                if time.perf_counter() >= deadline:
                    break
                payload = body(index, number, tag)
                began = time.perf_counter()
                try:
                    response = await http.post("/v1/tasks", content=payload, headers=headers)
                except httpx.HTTPError as exc:
                    errors[exc.__class__.__name__] += 1
                    continue
                elapsed = time.perf_counter() - began
                statuses[str(response.status_code)] += 1
                if response.status_code == 201:
                    latencies.append(elapsed * 1000)
        tally.merge(latencies, statuses, errors)

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        jobs = [run(i, deadline) for i in range(clients)]
        await asyncio.wait_for(asyncio.gather(*jobs), seconds + timeout + 10)

    asyncio.run(main())
    return tally


def client_threads(client: Any, clients: int, seconds: float, tag: str, timeout: float) -> Tally:
    """``clients`` threads calling ``tasker.Client.submit`` on one Client (its pool)."""
    tally = Tally()

    def run(index: int, ready: Callable[[], None], running: Callable[[], bool]) -> None:
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        ready()
        for number in itertools.count():
            if not running():
                break
            context = {"client": index, "n": number, "segment": tag, "order": f"o-{index}-{number}"}
            began = time.perf_counter()
            try:
                handle = client.submit(NAMESPACE, WORKFLOW, context)
            except Exception as exc:
                errors[exc.__class__.__name__] += 1
                continue
            latencies.append((time.perf_counter() - began) * 1000)
            statuses["created" if handle.created else "existing"] += 1
        tally.merge(latencies, statuses, errors)

    in_threads(clients, seconds, timeout, run)
    return tally


def in_threads(
    clients: int,
    seconds: float,
    timeout: float,
    work: Callable[[int, Callable[[], None], Callable[[], bool]], None],
) -> None:
    """Run ``work(index, ready, running)`` in ``clients`` threads: each calls ``ready()`` once
    set up, all start together, and ``running()`` turns false ``seconds`` later."""
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def ready() -> None:
        start.wait(timeout=30)

    def running() -> bool:
        return time.perf_counter() < deadline[0]

    threads = [
        threading.Thread(target=work, args=(i, ready, running), daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait(timeout=30)
    join_all(threads, seconds + timeout + 10)


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(end - time.monotonic(), 0.1))
    alive = sum(thread.is_alive() for thread in threads)
    if alive:
        raise BenchError(f"{alive} load thread(s) still running after {timeout_s:.0f} s.")


class Segment:
    """One timed window of one kind of load, with the CPU each party spent in it."""

    def __init__(self, server: ApiServer, pg: wb.PgCpu, url: str) -> None:
        self.server = server
        self.pg = pg
        self.url = url

    def run(self, kind: str, load: Callable[[], Tally]) -> dict[str, Any]:
        sampler = wb.WaitSampler(self.url)
        sampler.start()
        pg_before, api_before, own_before = self.pg.snapshot(), self.server.cpu(), own_cpu()
        began = time.perf_counter()
        tally = load()
        elapsed = time.perf_counter() - began
        sampler.stop_event.set()
        sampler.join(timeout=10)
        own = own_cpu() - own_before
        api = self.server.cpu() - api_before
        pg = wb.PgCpu.delta(pg_before, self.pg.snapshot())
        ok = len(tally.latencies)
        failed = sum(tally.errors.values()) + sum(
            n for status, n in tally.statuses.items() if status not in ("201", "created")
        )
        per_req = (lambda s: s * 1000 / ok) if ok else (lambda s: None)
        cores = psutil.cpu_count() or 1
        return {
            "kind": kind,
            "seconds": round(elapsed, 3),
            "ok": ok,
            "req_per_s": ok / elapsed if elapsed else None,
            "latency_ms": rounded(percentiles(tally.latencies)),
            "responses": dict(tally.statuses),
            "exceptions": dict(tally.errors),
            "failed": failed,
            "cpu_s": {"driver": own, "api_process": api, "postgres": pg},
            "cpu_ms_per_req": {"driver": per_req(own), "api_process": per_req(api)}
            | {"postgres": per_req(pg), "total": per_req(own + api + pg)},
            "share_of_cores": {
                "driver": own / (elapsed * cores),
                "api_process": api / (elapsed * cores),
                "postgres": pg / (elapsed * cores),
            },
            "api_memory_after": self.server.memory(),
            "pg_activity": sampler.result(),
            "_latencies": tally.latencies,
        }


def combine(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """The segments of one kind as one window."""
    seconds = sum(s["seconds"] for s in segments)
    ok = sum(s["ok"] for s in segments)
    latencies = [v for s in segments for v in s["_latencies"]]
    responses: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    cpu = Counter[str]()
    for s in segments:
        responses.update(s["responses"])
        exceptions.update(s["exceptions"])
        cpu.update(s["cpu_s"])
    return {
        "segments": len(segments),
        "seconds": round(seconds, 3),
        "ok": ok,
        "req_per_s": ok / seconds if seconds else None,
        "latency_ms": rounded(percentiles(latencies)),
        "responses": dict(responses),
        "exceptions": dict(exceptions),
        "failed": sum(s["failed"] for s in segments),
        "cpu_ms_per_req": {k: (v * 1000 / ok if ok else None) for k, v in cpu.items()}
        | {"total": sum(cpu.values()) * 1000 / ok if ok else None},
        "share_of_cores": {k: v / (seconds * (psutil.cpu_count() or 1)) for k, v in cpu.items()},
        "req_per_s_by_segment": [round(s["req_per_s"] or 0, 1) for s in segments],
    }


def serving_cpu(kind: str, combined: dict[str, Any]) -> float | None:
    """CPU per request of what serves it: API process + PostgreSQL for HTTP (the load
    generator left out), this process + PostgreSQL for Client.submit."""
    cpu = combined["cpu_ms_per_req"]
    parts = ("api_process", "postgres") if kind == "http" else ("driver", "postgres")
    if any(cpu.get(p) is None for p in parts):
        return None
    return float(sum(cpu[p] for p in parts))


def run_create(
    args: argparse.Namespace, server: ApiServer, client: Any, pg: wb.PgCpu
) -> dict[str, Any]:
    http_load = http_asyncio if args.http_client == "asyncio" else http_threads
    segment = Segment(server, pg, args.database_url)

    def http(seconds: float, tag: str) -> Callable[[], Tally]:
        return lambda: http_load(server.base_url, args.clients, seconds, tag, args.request_timeout)

    def direct(seconds: float, tag: str) -> Callable[[], Tally]:
        return lambda: client_threads(client, args.clients, seconds, tag, args.request_timeout)

    warmup = []
    if args.warmup_seconds > 0:
        for kind, load in (("http", http), ("client", direct)):
            result = segment.run(kind, load(args.warmup_seconds, f"warmup-{kind}"))
            result.pop("_latencies")
            warmup.append(result)
            print(
                f"[create] warm-up {kind}: {result['req_per_s']:.0f} req/s over "
                f"{result['seconds']:.1f} s",
                flush=True,
            )
    half = args.seconds / 2
    segments = []
    for number, kind in enumerate(("http", "client", "client", "http")):
        measured = (http if kind == "http" else direct)(half, f"{kind}-{number}")
        result = segment.run(kind, measured)
        segments.append(result)
        lat = result["latency_ms"]
        print(
            f"[create] segment {number + 1}/4 {kind}: {result['req_per_s']:.0f} req/s, "
            f"p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} "
            f"ms, failed {result['failed']}, API RSS "
            f"{fmt(result['api_memory_after']['rss_mib'], 1)} MiB",
            flush=True,
        )
    by_kind = {
        kind: combine([s for s in segments if s["kind"] == kind]) for kind in ("http", "client")
    }
    for kind, combined in by_kind.items():
        combined["serving_cpu_ms_per_req"] = serving_cpu(kind, combined)
    for s in segments:
        s.pop("_latencies")
    http_rate, client_rate = by_kind["http"]["req_per_s"], by_kind["client"]["req_per_s"]
    return {
        "order": "warm-up http, warm-up client, then http, client, client, http (A-B-B-A)",
        "segment_seconds": half,
        "warmup": warmup,
        "segments": segments,
        "http": by_kind["http"],
        "client": by_kind["client"],
        "ratio_http_over_client_req_per_s": (
            http_rate / client_rate if http_rate and client_rate else None
        ),
        "api_memory_after": server.memory(),
    }


# -- 3. list -------------------------------------------------------------------------------------


def timed_gets(
    server: ApiServer, state: str, requests: int, clients: int, timeout: float
) -> dict[str, Any]:
    """``requests`` GETs of one state's first page from ``clients`` keep-alive clients."""
    tally = Tally()
    rows: Counter[int] = Counter()
    numbers = iter(range(requests))
    take = threading.Lock()
    params: dict[str, str | int] = {"state": state, "limit": 50}

    def run() -> None:
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        with httpx.Client(base_url=server.base_url, timeout=timeout, trust_env=False) as http:
            while True:
                with take:
                    if next(numbers, None) is None:
                        break
                began = time.perf_counter()
                try:
                    response = http.get("/v1/tasks", params=params)
                except httpx.HTTPError as exc:
                    errors[exc.__class__.__name__] += 1
                    continue
                elapsed = time.perf_counter() - began
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(elapsed * 1000)
                    with take:
                        rows[len(response.json()["tasks"])] += 1
        tally.merge(latencies, statuses, errors)

    api_before, own_before = server.cpu(), own_cpu()
    began = time.perf_counter()
    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    join_all(threads, requests * timeout + 10)
    elapsed = time.perf_counter() - began
    api, own = server.cpu() - api_before, own_cpu() - own_before
    done = len(tally.latencies) or 1
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(elapsed, 3),
        "req_per_s": len(tally.latencies) / elapsed if elapsed else None,
        "latency_ms": rounded(percentiles(tally.latencies)),
        "responses": dict(tally.statuses),
        "exceptions": dict(tally.errors),
        "tasks_per_page": dict(rows),
        "cpu_ms_per_req": {"api_process": api * 1000 / done, "driver": own * 1000 / done},
    }


def explain_listing(url: str, state: str) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the statement ``list_tasks(state=state, limit=50)`` runs: its time,
    shared buffers and how each scan of ``tasks`` went (as the listing plan test records it)."""
    import psycopg
    from psycopg import sql

    from tasker.engine.listing import list_tasks

    log: list[tuple[Any, Any]] = []

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            log.append((query, params))
            return super().execute(query, params, **kwargs)

    with psycopg.connect(url, autocommit=True, cursor_factory=Recording) as conn:
        list_tasks(conn, state=state, limit=50)
        statement, params = log[-1]
        explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement
        row = conn.execute(explain, params, prepare=False).fetchone()
        plan = row[0][0] if row else {}

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", ()):
            yield from nodes(child)

    top = plan["Plan"]
    return {
        "execution_ms": plan.get("Execution Time"),
        "planning_ms": plan.get("Planning Time"),
        "shared_buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
        "tasks_scans": [
            {
                "node": n["Node Type"],
                "index": n.get("Index Name"),
                "rows": n.get("Actual Rows"),
                "rows_removed_by_filter": n.get("Rows Removed by Filter", 0),
            }
            for n in nodes(top)
            if n.get("Relation Name") == "tasks"
        ],
    }


def run_list(args: argparse.Namespace, server: ApiServer, client: Any, conn: Any) -> dict[str, Any]:
    mark = time.monotonic()
    conn.execute("VACUUM ANALYZE tasker.tasks")
    vacuum_s = time.monotonic() - mark
    counts = dict(
        conn.execute("SELECT state, count(*) FROM tasker.tasks GROUP BY state").fetchall()
    )
    states: dict[str, Any] = {}
    for state in args.get_states:
        timed_gets(server, state, GET_WARMUP, 1, args.request_timeout)
        sequential = timed_gets(server, state, args.get_requests, 1, args.request_timeout)
        concurrent = timed_gets(
            server, state, args.get_requests, args.get_clients, args.request_timeout
        )
        engine: list[float] = []
        for _ in range(args.engine_samples):
            began = time.perf_counter()
            client.list_tasks(state=state, limit=50)
            engine.append((time.perf_counter() - began) * 1000)
        plan = explain_listing(args.database_url, state)
        p99s = [sequential["latency_ms"].get("p99"), concurrent["latency_ms"].get("p99")]
        states[state] = {
            "tasks_in_state": counts.get(state, 0),
            "sequential": sequential,
            "concurrent": concurrent,
            "in_process_client_list_tasks_ms": rounded(percentiles(engine)),
            "db_plan": plan,
            "target_p99_met": all(p is not None and p <= GET_TARGET_P99_MS for p in p99s),
        }
        print(
            f"[list] state={state} ({counts.get(state, 0):,} tasks): sequential p50 "
            f"{fmt(sequential['latency_ms'].get('p50'), 1)} / p99 "
            f"{fmt(sequential['latency_ms'].get('p99'), 1)} ms; {args.get_clients} clients p50 "
            f"{fmt(concurrent['latency_ms'].get('p50'), 1)} / p99 "
            f"{fmt(concurrent['latency_ms'].get('p99'), 1)} ms",
            flush=True,
        )
    total = sum(counts.values())
    every = {
        mode: [v for s in states.values() for v in [s[mode]["latency_ms"].get("p99")]]
        for mode in ("sequential", "concurrent")
    }
    return {
        "tasks_in_table": total,
        "vacuum_analyze_before_s": round(vacuum_s, 2),
        "warmup_requests_per_state": GET_WARMUP,
        "target_p99_ms": GET_TARGET_P99_MS,
        "target_met": all(s["target_p99_met"] for s in states.values()),
        "worst_p99_ms": {
            m: max((p for p in v if p is not None), default=None) for m, v in every.items()
        },
        "states": states,
        "api_memory_after": server.memory(),
    }


# -- report --------------------------------------------------------------------------------------


def create_table(create: dict[str, Any]) -> str:
    header = ["path", "req/s", "p50 ms", "p99 ms", "ok", "failed", "errors"]
    header += ["CPU ms/req drv", "api", "pg", "total", "w/o load gen", "drv cores"]
    rows = []
    for kind, label in (("http", "POST /v1/tasks"), ("client", "Client.submit")):
        c = create[kind]
        failures = {k: v for k, v in c["responses"].items() if k not in ("201", "created")}
        failures |= c["exceptions"]
        cpu = c["cpu_ms_per_req"]
        serving = c["serving_cpu_ms_per_req"]
        rows.append(
            [
                label,
                fmt(c["req_per_s"]),
                fmt(c["latency_ms"].get("p50"), 1),
                fmt(c["latency_ms"].get("p99"), 1),
                fmt(c["ok"]),
                fmt(c["failed"]),
                ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) or "-",
                fmt(cpu.get("driver"), 2),
                fmt(cpu.get("api_process"), 2),
                fmt(cpu.get("postgres"), 2),
                fmt(cpu.get("total"), 2),
                fmt(serving, 2),
                fmt(c["share_of_cores"].get("driver", 0) * (psutil.cpu_count() or 1), 2),
            ]
        )
    return render(header, rows)


def list_table(listing: dict[str, Any], clients: int) -> str:
    header = ["state", "tasks", "seq p50", "seq p99", f"{clients}cl p50", f"{clients}cl p99"]
    header += [f"{clients}cl req/s", "in-proc p50", "db ms", "rows read", "api CPU/req"]
    header += ["rows/page", "p99<=50"]
    rows = []
    for state, s in listing["states"].items():
        seq, conc = s["sequential"], s["concurrent"]
        pages = ",".join(str(k) for k in sorted(seq["tasks_per_page"]))
        bad = {k: v for k, v in (seq["responses"] | conc["responses"]).items() if k != "200"}
        rows.append(
            [
                state,
                fmt(s["tasks_in_state"]),
                fmt(seq["latency_ms"].get("p50"), 1),
                fmt(seq["latency_ms"].get("p99"), 1),
                fmt(conc["latency_ms"].get("p50"), 1),
                fmt(conc["latency_ms"].get("p99"), 1),
                fmt(conc["req_per_s"]),
                fmt(s["in_process_client_list_tasks_ms"].get("p50"), 1),
                fmt(s["db_plan"]["execution_ms"], 1),
                fmt(
                    sum(
                        n["rows"] + n["rows_removed_by_filter"] for n in s["db_plan"]["tasks_scans"]
                    )
                ),
                fmt(seq["cpu_ms_per_req"]["api_process"], 2),
                pages + (f" ({bad})" if bad else ""),
                "yes" if s["target_p99_met"] else "NO",
            ]
        )
    return render(header, rows)


def memory_table(memory: list[tuple[str, dict[str, float | None]]]) -> str:
    rows = [[when, fmt(m["rss_mib"], 1), fmt(m["peak_rss_mib"], 1)] for when, m in memory]
    return render(["API process after", "RSS MiB", "peak RSS MiB"], rows)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --seconds 5 --clients 10 --tasks 50000 --get-requests 100 "
        "--warmup-seconds 1, no pg_test_fsync",
    )
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent creators, HTTP and Client (50)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="measured seconds of each of POST and Client.submit, as two halves A-B-B-A (30)",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="unmeasured load of each before the segments (3; --quick: 1)",
    )
    parser.add_argument(
        "--http-client",
        choices=("threads", "asyncio"),
        default="threads",
        help="HTTP load generator: threads (one thread with its own keep-alive httpx.Client "
        "per client; the least CPU per request here) or asyncio (one event loop, an "
        "httpx.AsyncClient per client)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="tasks inserted with SQL before the run, for the listing (1000000)",
    )
    parser.add_argument(
        "--seed-tasks",
        type=int,
        default=2000,
        help="tasks created with Client.submit (with their steps and transitions) before the "
        "API starts, then VACUUM ANALYZE, so that the step tables have statistics (2000)",
    )
    parser.add_argument(
        "--get-requests",
        type=int,
        default=None,
        help="GET /v1/tasks requests per state, sequential and again concurrent (500)",
    )
    parser.add_argument(
        "--get-clients", type=int, default=4, help="concurrent clients of the GET phase (4)"
    )
    parser.add_argument(
        "--get-states",
        default=DEFAULT_GET_STATES,
        help=f"comma-separated states listed, one filter per request ({DEFAULT_GET_STATES})",
    )
    parser.add_argument(
        "--engine-samples",
        type=int,
        default=100,
        help="in-process Client.list_tasks calls per state, to compare with HTTP (100)",
    )
    parser.add_argument(
        "--api-threads",
        type=int,
        default=None,
        help="TASKER_API__THREADS of the API process (default: its setting, 40)",
    )
    parser.add_argument(
        "--pool-max-size",
        type=int,
        default=None,
        help="TASKER_DATABASE__POOL_MAX_SIZE of the API process and of the in-process Client "
        "(default: the setting, 16)",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="benchmark database: dropped (WITH (FORCE)), re-created and migrated; the name "
        "must contain 'bench'. Dropped again at the end unless --keep-database",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help="leave the database for inspection"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where the JSON and logs go"
    )
    parser.add_argument(
        "--no-fsync-probe", action="store_true", help="skip pg_test_fsync -s 1 (about 15 s)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="bound of one request / submit (s)"
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=60.0, help="bound on the API process start (s)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="bound on the API process stop after SIGTERM, then SIGKILL (s)",
    )
    args = parser.parse_args(argv)
    quick = {"clients": 10, "seconds": 5.0, "tasks": 50_000, "get_requests": 100}
    full = {"clients": 50, "seconds": 30.0, "tasks": 1_000_000, "get_requests": 500}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_seconds is None:
        args.warmup_seconds = 1.0 if args.quick else 3.0
    if args.quick:
        args.no_fsync_probe = True
    args.get_states = [s.strip() for s in args.get_states.split(",") if s.strip()]
    from tasker.workflow.states import TaskState

    unknown = set(args.get_states) - {s.value for s in TaskState}
    if unknown:
        parser.error(f"unknown state(s): {', '.join(sorted(unknown))}")
    if args.clients < 1 or args.seconds <= 0 or args.tasks < 1 or args.get_requests < 1:
        parser.error("--clients, --tasks and --get-requests must be >= 1, --seconds > 0")
    require_local(args.database_url, "--database-url")
    return args


def machine() -> dict[str, Any]:
    info = machine_info()
    for name in EXTRA_PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["psutil_cpu_percent_1s_at_start"] = psutil.cpu_percent(interval=1.0)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    logdir = args.results_dir / f"api_{stamp}_logs"
    logdir.mkdir()
    env = tasker_env(args)
    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "argv": sys.argv,
        "config": {
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "http_client": args.http_client,
            "tasks": args.tasks,
            "get_requests": args.get_requests,
            "get_clients": args.get_clients,
            "get_states": args.get_states,
            "engine_samples": args.engine_samples,
            "database": redact(args.database_url),
            "api_env": {k: redact(v) for k, v in env.items()},
            "template": f"{NAMESPACE}/{WORKFLOW}@{VERSION}: 2 no-op steps, always_unique",
            "notes": [
                "TASKER_API__MAX_QUEUE_DEPTH=0: backpressure off (no worker runs, so every "
                "created task stays queued and the queue only grows)",
                "the in-process tasker.Client is built from the same TASKER_* settings as the "
                "API process (same pool size, broker middleware)",
                "closed loop: each client waits for its answer before the next request",
                "load generator, API process and PostgreSQL share the machine's cores",
            ],
        },
        "machine": machine(),
    }
    print(f"[setup] database {redact(args.database_url)}: drop, create, migrate", flush=True)
    recreate_database(args.database_url)
    status = 0
    memory: list[tuple[str, dict[str, float | None]]] = []
    conn = connect(args.database_url)
    server: ApiServer | None = None
    client: Any = None
    try:
        report["postgres"] = server_info(conn)
        print(f"[load] inserting {args.tasks:,} tasks with SQL ...", flush=True)
        report["load"] = load_tasks(conn, args.tasks)
        print(
            f"[load] {args.tasks:,} tasks in {report['load']['seconds']['total_s']:.1f} s "
            f"(table {report['load']['table_size']}, indexes {report['load']['indexes_size']}); "
            f"by state: {report['load']['by_state']}",
            flush=True,
        )
        import tasker

        settings = load_tasker_settings(env)
        report["config"]["api_settings"] = {
            "threads": settings.api.threads,
            "pool_max_size": settings.database.pool_max_size,
            "max_queue_depth": settings.api.max_queue_depth,
            "env": settings.env,
        }
        client = tasker.Client(settings=settings)
        report["template"] = register_template(client)
        if args.seed_tasks:
            report["seed"] = seed(client, conn, args.seed_tasks)
            print(f"[load] seeded {args.seed_tasks:,} tasks with Client.submit", flush=True)
        server = ApiServer(env, logdir / "serve.log")
        boot = server.start(args.boot_timeout)
        report["api_boot_seconds"] = round(boot, 2)
        memory.append(("boot", server.memory()))
        print(f"[api] {server.base_url} ready in {boot:.1f} s (pid {server.pid})", flush=True)
        pg = wb.PgCpu(conn)
        print(
            f"[create] {args.clients} clients, {args.seconds:g} s each of HTTP and Client "
            f"({args.http_client} load generator)",
            flush=True,
        )
        report["create"] = run_create(args, server, client, pg)
        memory.append(("create (POST + Client)", report["create"]["api_memory_after"]))
        print(
            f"[list] {args.get_requests} requests per state, sequential and {args.get_clients} "
            "clients",
            flush=True,
        )
        report["list"] = run_list(args, server, client, conn)
        memory.append(("list (GET)", report["list"]["api_memory_after"]))
    except Exception as exc:
        report["error"] = f"{exc.__class__.__name__}: {exc}"
        print(f"failed: {exc}", flush=True)
        status = 1
    finally:
        if server is not None:
            report["api_stop"] = server.stop(args.stop_timeout)
            report["api_log_issues"] = log_issues(server.worker.log)
        for resource in (client, conn):
            if resource is not None:
                with contextlib.suppress(Exception):
                    resource.close()
        if not args.keep_database:
            drop_database(args.database_url)
            report["database_dropped"] = True
    report["api_memory"] = dict(memory)
    if not args.no_fsync_probe:
        print("[machine] pg_test_fsync -s 1 ...", flush=True)
        report["machine"]["pg_test_fsync"] = pg_test_fsync(
            report.get("postgres", {}).get("data_directory")
        )
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    tables = []
    if "create" in report:
        create = report["create"]
        ratio = create["ratio_http_over_client_req_per_s"]
        tables += [
            f"Create: {args.clients} clients, {args.seconds:g} s each (A-B-B-A halves), closed "
            f"loop; backpressure off (TASKER_API__MAX_QUEUE_DEPTH=0); template of 2 no-op "
            f"steps, no workers. Load generator: {args.http_client}. 'drv' = this process "
            "(the HTTP load generator, or the Client itself); 'w/o load gen' = api + pg for "
            "HTTP, drv + pg for Client; 'drv cores' = cores this process used.",
            create_table(create),
            f"HTTP / Client req/s: {fmt(ratio, 2)}",
            "",
        ]
    if "list" in report:
        listing = report["list"]
        tables += [
            f"List: GET /v1/tasks?state=S&limit=50 over {listing['tasks_in_table']:,} tasks, "
            f"{args.get_requests} requests per state sequential and {args.get_clients} clients "
            f"(after {GET_WARMUP} warm-up); times in ms; in-proc = Client.list_tasks.",
            list_table(listing, args.get_clients),
            f"target p99 <= {GET_TARGET_P99_MS:g} ms: "
            f"{'met' if listing['target_met'] else 'NOT met'} "
            f"(worst p99 sequential {fmt(listing['worst_p99_ms']['sequential'], 1)} ms, "
            f"{args.get_clients} clients {fmt(listing['worst_p99_ms']['concurrent'], 1)} ms)",
            "",
        ]
    tables.append(memory_table(memory))
    text = "\n".join(tables)
    report["table"] = text.splitlines()
    path = args.results_dir / f"api_{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(text)
    print(f"\nlogs: {logdir}\nresults: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())

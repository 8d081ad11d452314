"""The coordinator's commands of the ``tasker`` CLI: ``coordinator``, ``workers``, ``scale`` and
``dlq tasks``. Each prints a table, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tasker.cli_args import LIMIT_MAX, coordinator_interval, limit, tcp_port
from tasker.cli_output import jsonable

if TYPE_CHECKING:
    from tasker.coordinator.loop import Coordinator
    from tasker.health_http import HealthServer

__all__ = ["add_coordinator_commands", "add_dlq_task_commands"]

Handler = Callable[[argparse.Namespace], int]


def add_coordinator_commands(commands: Any) -> None:
    """Add ``coordinator``, ``workers`` and ``scale`` to the CLI's subcommands."""
    coordinator = commands.add_parser(
        "coordinator",
        help="run the coordinator: recovery sweeps, task DLQ, retention, scaling hints",
        description="Runs the coordinator until SIGTERM or SIGINT: every coordinator.interval_s "
        "seconds the leader (one among any number of replicas, by a PostgreSQL advisory lock) "
        "recovers lost steps, moves stale tasks to the task DLQ, applies retention and writes "
        "the scaling hints. Serves /metrics, /health/live and /health/ready. See "
        "docs/operations.md.",
    )
    coordinator.add_argument(
        "--port", type=tcp_port, default=None, help="HTTP port (default: coordinator.port, 9191)"
    )
    coordinator.add_argument(
        "--interval",
        type=coordinator_interval,
        default=None,
        help="seconds per cycle (coordinator.interval_s)",
    )
    coordinator.add_argument(
        "--once", action="store_true", help="run one cycle, print what it did and exit"
    )
    coordinator.add_argument(
        "--json", action="store_true", help="with --once: print the report as JSON"
    )
    coordinator.set_defaults(handler=_cmd_coordinator, parser=coordinator)

    workers = commands.add_parser("workers", help="list the worker processes (the registry)")
    workers.add_argument("--all", action="store_true", help="also workers no longer seen")
    workers.add_argument("--json", action="store_true", help="print JSON")
    workers.set_defaults(handler=_cmd_workers)

    scale = commands.add_parser(
        "scale", help="show the scaling hints: desired worker pods per queue"
    )
    scale.add_argument("--json", action="store_true", help="print JSON")
    scale.set_defaults(handler=_cmd_scale)


def add_dlq_task_commands(dlq_commands: Any) -> None:
    """Add ``dlq tasks list|show|resolve`` (the task DLQ) under ``tasker dlq``."""
    tasks = dlq_commands.add_parser("tasks", help="the task DLQ: stale tasks given up")
    sub = tasks.add_subparsers(title="dlq tasks commands", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="list task DLQ entries (pending by default)")
    listing.add_argument(
        "--status",
        default="pending",
        choices=["pending", "manually_resolved", "permanently_failed", "cancelled", "all"],
        help="entries with this resolution status (default: pending)",
    )
    listing.add_argument(
        "--limit",
        type=limit,
        default=50,
        help=f"at most this many, up to {LIMIT_MAX} (default 50)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_dlq_tasks_list)
    show = sub.add_parser(
        "show", help="one entry with its task snapshot (a summary, or everything with --json)"
    )
    show.add_argument("entry", help="the entry id (dlq_entry_uuid)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_cmd_dlq_tasks_show)
    resolve = sub.add_parser("resolve", help="close a pending entry")
    resolve.add_argument("entry", help="the entry id (dlq_entry_uuid)")
    resolve.add_argument(
        "--status",
        required=True,
        choices=["manually_resolved", "permanently_failed", "cancelled"],
        help="how it was resolved",
    )
    resolve.add_argument("--notes", default=None, help="what was done")
    resolve.add_argument("--by", default=None, help="who resolved it")
    resolve.add_argument("--json", action="store_true", help="print the resolved entry as JSON")
    resolve.set_defaults(handler=_cmd_dlq_tasks_resolve)


# -- handlers ------------------------------------------------------------------------------------


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import msgspec

    from tasker.coordinator.loop import Coordinator
    from tasker.runtime.broker import broker_from_settings
    from tasker.runtime.sentry import init_sentry
    from tasker.settings import load_settings

    if args.json and not args.once:
        args.parser.error("--json prints the report of --once: add --once, or drop --json")
    settings = load_settings()
    overrides: dict[str, Any] = {}
    if args.interval is not None:
        overrides["interval_s"] = args.interval
    if args.port is not None:
        overrides["port"] = args.port
    config = msgspec.structs.replace(settings.coordinator, **overrides)
    init_sentry(settings, component="coordinator")  # before the broker (see init_sentry)
    broker = broker_from_settings(settings)
    coordinator = Coordinator(broker, config)
    try:
        if args.once:
            with _connection():
                pass  # an unreachable database is an error here, not a report of a standby
            report = coordinator.cycle()
            _print(jsonable(dataclasses.asdict(report)), args.json, _report_lines)
            return 1 if report.errors else 0  # a cron job sees a failed action
        server = _health_server(coordinator, config.port)
        server.start()
        print(f"coordinator {coordinator.name}: metrics and health on :{server.port}")
        stop = threading.Event()
        with _stop_on_signals(stop):
            coordinator.run(stop)
        server.stop()
        return 0
    finally:
        coordinator.close()
        broker.close()


def _health_server(coordinator: Coordinator, port: int) -> HealthServer:
    """The coordinator's HTTP server on ``port``; a port it cannot listen on is a
    :class:`ConfigurationError` saying how to choose another."""
    from tasker.health_http import HealthServer, listen_error

    try:
        return HealthServer(coordinator.metrics.registry, coordinator.ready, port=port)
    except OSError as exc:
        raise listen_error(
            exc,
            port,
            who="coordinator",
            fix="pass --port with a free port (0: any free one), or set coordinator.port "
            "(TASKER_COORDINATOR__PORT).",
        ) from None


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    previous = {
        sig: signal.signal(sig, lambda _signum, _frame: stop.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_workers(args: argparse.Namespace) -> int:
    from tasker.engine.registry import list_workers

    with _connection() as (conn, settings):
        rows = list_workers(conn, live_s=settings.coordinator.live_worker_s)
    rows = [row for row in rows if args.all or row.live]
    data = [jsonable(dataclasses.asdict(row)) for row in rows]
    _print(data, args.json, _worker_lines)
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    from tasker.engine.scaling import read_scaling_hints

    with _connection() as (conn, _settings):
        hints = read_scaling_hints(conn)
    _print([jsonable(dataclasses.asdict(h)) for h in hints], args.json, _scale_lines)
    return 0


def _cmd_dlq_tasks_list(args: argparse.Namespace) -> int:
    from tasker.engine.staleness import list_dlq

    status = None if args.status == "all" else args.status
    with _connection() as (conn, _settings):
        entries = list_dlq(conn, status=status, limit=args.limit)
    data = [jsonable(dataclasses.asdict(e)) for e in entries]
    _print(data, args.json, _dlq_lines)
    return 0


def _cmd_dlq_tasks_show(args: argparse.Namespace) -> int:
    from tasker.engine.staleness import get_dlq_entry

    with _connection() as (conn, _settings):
        entry = get_dlq_entry(conn, args.entry)
    data = jsonable(dataclasses.asdict(entry))
    _print(data, args.json, _dlq_entry_lines)
    return 0


def _cmd_dlq_tasks_resolve(args: argparse.Namespace) -> int:
    from tasker.engine.staleness import get_dlq_entry, resolve_dlq_entry

    with _connection() as (conn, _settings):
        resolve_dlq_entry(conn, args.entry, status=args.status, notes=args.notes, by=args.by)
        entry = get_dlq_entry(conn, args.entry)
    if args.json:
        _print(jsonable(dataclasses.asdict(entry)), True, _dlq_entry_lines)
    else:
        print(f"task DLQ entry {args.entry} resolved: {args.status}")
    return 0


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def _connection() -> Iterator[tuple[Any, Any]]:
    import psycopg

    from tasker.db.connection import connect
    from tasker.db.errors import database_error
    from tasker.db.resolve import resolve_database_url
    from tasker.settings import load_settings

    settings = load_settings()
    url = resolve_database_url(settings.database)
    try:
        with connect(url) as conn:
            yield conn, settings
    except psycopg.Error as exc:
        raise database_error(exc, url=url) from exc


def _print(data: Any, as_json: bool, lines: Callable[[Any], Sequence[str]]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for line in lines(data):
        print(line)


def _report_lines(report: dict[str, Any]) -> list[str]:
    """A cycle's report in a few lines (``--json`` prints all of it)."""
    if not report["leader"]:
        return ["not the leader: another coordinator leads, so this cycle did nothing"]
    actions: dict[str, int] = {}
    for recovery in report["recovered"]:
        actions[recovery["action"]] = actions.get(recovery["action"], 0) + 1
    recovered = ", ".join(f"{name} {count}" for name, count in sorted(actions.items()))
    retention = report["retention"]
    lines = [
        "leader: yes",
        f"recovered: {len(report['recovered'])}" + (f" ({recovered})" if recovered else ""),
        f"stale tasks moved to the task DLQ: {len(report['dead_lettered'])}",
        "retention: "
        + (
            "not due this cycle"
            if retention is None
            else f"{retention['tasks']} task(s) deleted in {retention['batches']} batch(es), "
            f"{retention['dead_letters_expired']} dead letter(s) expired"
        ),
        "scaling hints: "
        + (", ".join(f"{h['queue']}={h['desired_replicas']}" for h in report["hints"]) or "none"),
    ]
    lines += [f"error in {action}: {text}" for action, text in report["errors"].items()]
    return lines


def _worker_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        f"{'host':<24} {'pid':>7} {'threads':>7} {'in_flight':>9} {'processed':>10} "
        f"{'failed':>7} {'live':>5}  queues"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['hostname'][:24]:<24} {r['pid']:>7} {r['threads']:>7} {r['in_flight']:>9} "
            f"{r['processed']:>10} {r['failed']:>7} {'yes' if r['live'] else 'no':>5}  "
            f"{','.join(r['queues'])}"
        )
    if not rows:
        lines.append("(no live workers; start some with `tasker worker MODULES`)")
    return lines


def _scale_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        f"{'queue':<40} {'depth':>7} {'age_s':>7} {'in_flight':>9} {'done/s':>8} "
        f"{'errors':>7} {'live':>5} {'desired':>7}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['queue'][:40]:<40} {r['depth']:>7} {r['oldest_age_s']:>7.1f} "
            f"{r['in_flight']:>9} {r['completions_per_s']:>8.2f} {r['error_rate']:>7.1%} "
            f"{r['live_replicas']:>5} {r['desired_replicas']:>7}"
        )
    if not rows:
        lines.append("(no hints yet: is `tasker coordinator` running?)")
    return lines


def _dlq_entry_lines(entry: dict[str, Any]) -> list[str]:
    snapshot = entry.get("task_snapshot") or {}
    version = snapshot.get("version", "")
    lines = [
        f"entry     {entry['dlq_entry_uuid']}",
        f"task      {entry['task_uuid']}  {entry.get('namespace')}/{entry.get('task_name')} "
        f"{version}".rstrip(),
        f"was       {entry['original_state']}, given up {entry['dlq_timestamp']} "
        f"({entry['dlq_reason']}; {snapshot.get('time_in_state_minutes')} min, limit "
        f"{snapshot.get('threshold_minutes')})",
        f"status    {entry['resolution_status']}"
        + (
            f" at {entry['resolution_timestamp']} by {entry.get('resolved_by') or '-'}: "
            f"{entry.get('resolution_notes') or ''}"
            if entry.get("resolution_timestamp")
            else ""
        ),
        "",
        f"{'step':<32} {'state':<24} {'attempts':>8}  last error",
    ]
    for step in snapshot.get("steps", []):
        error = step.get("error") or {}
        message = str(error.get("message", ""))[:60] if isinstance(error, dict) else ""
        lines.append(
            f"{step['name'][:32]:<32} {step['state']:<24} "
            f"{step['attempts']:>3}/{step['max_attempts']:<4}  {message}"
        )
    lines.append("")
    lines.append("(the whole snapshot, the task's context included: --json)")
    return lines


def _dlq_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = f"{'entry':<36} {'task':<36} {'workflow':<30} {'was':<18} {'status':<18}"
    lines = [header]
    for r in rows:
        workflow = f"{r.get('namespace')}/{r.get('task_name')}"
        lines.append(
            f"{r['dlq_entry_uuid']:<36} {r['task_uuid']:<36} {workflow[:30]:<30} "
            f"{r['original_state']:<18} {r['resolution_status']:<18}"
        )
    if not rows:
        lines.append("(the task DLQ is empty)")
    return lines

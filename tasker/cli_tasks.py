"""The operator's commands of the ``tasker`` CLI: ``task``, ``step`` and ``templates``.

Every command prints a table (or JSON with ``--json``) and exits with a code that means something
to a script (docs/operations.md, "Operating tasks from the shell"):

* the command itself: 0 done, 1 refused or failed (the error line says why), 2 usage,
  3 not found (task, step, template), 4 timed out waiting, 10 cannot reach the database;
* ``task wait`` (and ``task submit --wait``), the task's outcome: 0 ``complete`` or
  ``resolved_manually``, 1 ``error``, 5 ``cancelled``, 6 waiting in ``blocked_by_failures``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasker.cli_args import (
    actor_text,
    int_range,
    iso_datetime,
    json_object,
    json_value,
    key_value,
    reason_text,
    strict_json,
    wait_seconds,
)
from tasker.cli_output import print_json, printable
from tasker.exceptions import (
    DatabaseUnavailableError,
    DlqEntryNotFoundError,
    InvalidFilterError,
    PayloadError,
    StepNotFoundError,
    TaskerError,
    TaskNotFoundError,
    TaskTimeoutError,
    TemplateNotFoundError,
)

if TYPE_CHECKING:
    from tasker.client import Client
    from tasker.engine.status import TaskStatus

__all__ = [
    "EXIT_BLOCKED",
    "EXIT_CANCELLED",
    "EXIT_DATABASE",
    "EXIT_NOT_FOUND",
    "EXIT_TIMEOUT",
    "add_task_commands",
    "outcome_exit_code",
]

Handler = Callable[[argparse.Namespace], int]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_BLOCKED = 6
EXIT_DATABASE = 10

_OUTCOME_CODES = {
    "complete": 0,
    "resolved_manually": 0,
    "error": EXIT_FAILED,
    "cancelled": EXIT_CANCELLED,
    "blocked_by_failures": EXIT_BLOCKED,
}
_OUTCOMES_HELP = (
    "exit code: 0 complete or resolved_manually, 1 error, 5 cancelled, 6 blocked_by_failures "
    "(waiting for `tasker step retry|resolve|complete`), 3 no such task, 4 timed out, "
    "10 database unreachable"
)
_REASON_HELP = "why (kept in the audit; at most 2000 characters)"
_BY_HELP = (
    "who takes the action, for the audit; 1 to 128 characters (default: your user name @ this host)"
)


def outcome_exit_code(state: str) -> int:
    """The exit code of a settled task's state (``task wait``); 0 for a state not settled."""
    return _OUTCOME_CODES.get(state, 0)


def add_task_commands(commands: Any) -> None:
    """Add ``task``, ``step`` and ``templates`` to the CLI's subcommands."""
    _add_task(commands)
    _add_step(commands)
    _add_templates(commands)


# -- parsers -------------------------------------------------------------------------------------


def _add_task(commands: Any) -> None:
    task = commands.add_parser(
        "task",
        help="submit, list, inspect, wait for and cancel tasks",
        description="Tasks are workflow runs. TASK is a task id (a UUID, as `tasker task list` "
        "or `tasker task submit` prints it).",
    )
    sub = task.add_subparsers(title="task commands", metavar="COMMAND", required=True)
    _add_task_submit(sub)
    _add_task_views(sub)
    _add_task_actions(sub)


def _add_task_submit(sub: Any) -> None:
    submit = sub.add_parser(
        "submit",
        help="create a task from a registered template; prints its id",
        description="Create a task of NAMESPACE/NAME (the latest registered version unless "
        "--version). Prints the task id. With --wait, waits as `tasker task wait` does and "
        "exits with the task's outcome. "
        + _OUTCOMES_HELP.replace("3 no such task", "3 no such template")
        + ".",
    )
    submit.add_argument("namespace", help="the workflow's namespace")
    submit.add_argument("name", help="the workflow's name")
    context = submit.add_mutually_exclusive_group()
    context.add_argument(
        "--context", type=json_object, default=None, help="the task context, a JSON object"
    )
    context.add_argument(
        "--context-file",
        type=Path,
        default=None,
        help="read the context from this JSON file (- for stdin)",
    )
    submit.add_argument("--version", help="template version (default: the latest release)")
    submit.add_argument("--idempotency-key", help="one task per key (see docs/workflows.md)")
    submit.add_argument(
        "--priority", type=int_range(-100, 100), default=0, help="-100..100 (default 0)"
    )
    submit.add_argument("--initiator", help="who asks (stored, searchable)")
    submit.add_argument("--source-system", help="which system asks (stored, searchable)")
    submit.add_argument("--reason", help="why (stored)")
    submit.add_argument(
        "--tag",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tag (repeatable; the value is JSON if it parses, else text)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the task to settle")
    submit.add_argument(
        "--timeout", type=wait_seconds, default=60.0, help="with --wait: seconds (default 60)"
    )
    submit.add_argument("--json", action="store_true", help="print JSON")
    submit.add_argument("-q", "--quiet", action="store_true", help="print the task id only")
    submit.set_defaults(handler=_guarded(_cmd_task_submit))


def _add_task_views(sub: Any) -> None:
    get = sub.add_parser(
        "get",
        help="show a task and its steps in dependency order",
        description="The task's state, then its steps in dependency order with their state, "
        "attempts and last error.",
    )
    get.add_argument("task", metavar="TASK", help="task id")
    get.add_argument("--json", action="store_true", help="print JSON (every field)")
    get.set_defaults(handler=_guarded(_cmd_task_get))

    listing = sub.add_parser(
        "list",
        help="list tasks, newest first, with filters",
        description="Tasks matching every filter given, newest first. Prints a cursor for the "
        "next page when there is one (pass it with --cursor).",
    )
    listing.add_argument("--namespace")
    listing.add_argument("--workflow", help="workflow (template) name")
    listing.add_argument("--version", help="template version")
    listing.add_argument(
        "--state", action="append", default=[], help="task state (repeatable: any of them)"
    )
    listing.add_argument("--since", type=iso_datetime, help="requested at or after (ISO 8601)")
    listing.add_argument("--until", type=iso_datetime, help="requested before (ISO 8601)")
    listing.add_argument("--initiator")
    listing.add_argument("--source-system")
    listing.add_argument(
        "--tag",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tasks with this tag (repeatable: all of them)",
    )
    listing.add_argument(
        "--limit", type=int_range(1, 1000), default=50, help="tasks per page, 1..1000 (50)"
    )
    listing.add_argument("--cursor", help="the cursor a previous page printed")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_guarded(_cmd_task_list))

    audit = sub.add_parser(
        "audit",
        help="a task's (or a step's) transitions, newest first, with who did what and why",
    )
    audit.add_argument("task", metavar="TASK", help="task id")
    audit.add_argument("--step", help="a step's name or id: its transitions instead")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(handler=_guarded(_cmd_task_audit))


def _add_task_actions(sub: Any) -> None:
    wait = sub.add_parser(
        "wait",
        help="wait until a task is final or blocked; exit code = its outcome",
        description="Waits until the task is final or waits in blocked_by_failures, showing "
        "progress on stderr (steps done / total, the running step), then prints it as "
        "`tasker task get` does. " + _OUTCOMES_HELP + ".",
    )
    wait.add_argument("task", metavar="TASK", help="task id")
    wait.add_argument("--timeout", type=wait_seconds, default=60.0, help="seconds (default 60)")
    wait.add_argument("--json", action="store_true", help="print the final status as JSON")
    wait.add_argument("-q", "--quiet", action="store_true", help="no progress, no output")
    wait.set_defaults(handler=_guarded(_cmd_task_wait))

    cancel = sub.add_parser(
        "cancel",
        help="cancel a task: no step starts afterwards",
        description="The task becomes cancelled at once; steps that are not running are "
        "cancelled and their queued messages removed; a step running now may finish and is "
        "recorded. Refused (exit 1) for a task that is final already.",
    )
    cancel.add_argument("task", metavar="TASK", help="task id")
    cancel.add_argument(
        "--reason",
        type=reason_text,
        default="",
        help="why (kept in the audit; at most 2000 characters)",
    )
    cancel.add_argument("--by", type=actor_text, default=None, help=_BY_HELP)
    cancel.add_argument("--json", action="store_true", help="print JSON")
    cancel.set_defaults(handler=_guarded(_cmd_task_cancel))


def _add_step(commands: Any) -> None:
    step = commands.add_parser(
        "step",
        help="retry, resolve or complete a failed step by hand",
        description='Manual step actions (docs/workflows.md, "Operating a workflow"). STEP is '
        "the step's name or id. On a task waiting in blocked_by_failures or given up in error, "
        "the task runs on. Each action is recorded with --by and --reason.",
    )
    sub = step.add_subparsers(title="step commands", metavar="COMMAND", required=True)
    actions = {
        "retry": "run a failed step (in error) again, attempts back to 0",
        "resolve": "mark a step resolved_manually: dependents run without its result",
        "complete": "mark a step complete with the result dependents will read (--result)",
    }
    for name, text in actions.items():
        parser = sub.add_parser(name, help=text, description=text + ".")
        parser.add_argument("task", metavar="TASK", help="task id")
        parser.add_argument("step", metavar="STEP", help="step name or id")
        if name == "complete":
            result = parser.add_mutually_exclusive_group(required=True)
            # SUPPRESS: a result of null is a result, not a missing option
            result.add_argument(
                "--result",
                type=json_value,
                default=argparse.SUPPRESS,
                help="the step's result, as JSON (e.g. '{\"n\": 1}'; null is a result too)",
            )
            result.add_argument(
                "--result-file",
                type=Path,
                default=argparse.SUPPRESS,
                help="read the result from this JSON file (- for stdin)",
            )
        parser.add_argument(
            "--reason",
            type=reason_text,
            default="",
            help="why (kept in the audit; at most 2000 characters)",
        )
        parser.add_argument("--by", type=actor_text, default=None, help=_BY_HELP)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(handler=_guarded(_cmd_step_action), action=name)


def _add_templates(commands: Any) -> None:
    templates = commands.add_parser("templates", help="list and show registered templates")
    sub = templates.add_subparsers(title="templates commands", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="registered templates, every version")
    listing.add_argument("--namespace", help="only this namespace")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_guarded(_cmd_templates_list))
    show = sub.add_parser(
        "show", help="a template's steps and settings (the latest release unless --version)"
    )
    show.add_argument("namespace")
    show.add_argument("name")
    show.add_argument("--version", help="a registered version (default: the latest release)")
    show.add_argument("--json", action="store_true", help="print the whole template as JSON")
    show.set_defaults(handler=_guarded(_cmd_templates_show))


# -- handlers ------------------------------------------------------------------------------------


def _cmd_task_submit(args: argparse.Namespace) -> int:
    context = args.context
    if args.context_file is not None:
        context = _read_json(args.context_file, "--context-file")
        if not isinstance(context, dict):
            raise _UsageError(
                f"--context-file {args.context_file}: the context must be a JSON object"
            )
    with _client() as client:
        handle = client.submit(
            args.namespace,
            args.name,
            context or {},
            version=args.version,
            idempotency_key=args.idempotency_key,
            priority=args.priority,
            initiator=args.initiator,
            source_system=args.source_system,
            reason=args.reason,
            tags=dict(args.tag) or None,
        )
        if args.quiet:
            print(handle.task_uuid)
        elif args.json and not args.wait:
            print_json(asdict(handle))
        elif not args.json:
            verb = "created" if handle.created else "exists already (same identity)"
            print(
                f"task {handle.task_uuid} {verb}: {handle.namespace}/{handle.name} {handle.version}"
            )
        if not args.wait:
            return 0
        try:
            status = _wait(client, handle.task_uuid, args.timeout, quiet=args.quiet)
        except TaskTimeoutError:
            if args.json:  # the script still learns which task it created
                print_json({**asdict(handle), "settled": False})
            raise
    if not args.quiet:
        _print_status(status, args.json)
    return outcome_exit_code(status.state)


def _cmd_task_get(args: argparse.Namespace) -> int:
    with _client() as client:
        status = client.status(args.task)
    _print_status(status, args.json)
    return 0


def _cmd_task_list(args: argparse.Namespace) -> int:
    with _client() as client:
        page = client.list_tasks(
            namespace=args.namespace,
            workflow=args.workflow,
            version=args.version,
            state=args.state or None,
            since=args.since,
            until=args.until,
            initiator=args.initiator,
            source_system=args.source_system,
            tags=dict(args.tag) or None,
            limit=args.limit,
            cursor=args.cursor,
        )
    if args.json:
        data = {"tasks": [asdict(t) for t in page.tasks], "next_cursor": page.next_cursor}
        print_json(data)
        return 0
    print(f"{'task':<36}  {'workflow':<36} {'state':<20} {'requested':<25}  initiator")
    for t in page.tasks:
        workflow = printable(f"{t.namespace}/{t.workflow} {t.version}")
        print(
            f"{t.task_uuid:<36}  {workflow[:36]:<36} {t.state:<20} "
            f"{_when(t.requested_at):<25}  {printable(t.initiator or '-')}"
        )
    if not page.tasks:
        print("(no tasks match)")
    if page.next_cursor:
        print(f"next page: the same command with --cursor {page.next_cursor}")
    return 0


def _cmd_task_wait(args: argparse.Namespace) -> int:
    with _client() as client:
        status = _wait(client, args.task, args.timeout, quiet=args.quiet)
    if not args.quiet:
        _print_status(status, args.json)
    return outcome_exit_code(status.state)


def _cmd_task_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        done = client.cancel(args.task, by=_operator(args.by), reason=args.reason)
    if args.json:
        print_json(asdict(done))
        return 0
    print(
        f"task {done.task_uuid} cancelled: {len(done.cancelled_steps)} step(s) cancelled, "
        f"{done.messages_removed} queued message(s) removed"
    )
    if done.running_steps:
        print(f"{len(done.running_steps)} step(s) running now may finish; they start nothing")
    return 0


def _cmd_task_audit(args: argparse.Namespace) -> int:
    with _client() as client:
        entries = client.audit(args.task, args.step)
    if args.json:
        print_json([asdict(e) for e in entries])
        return 0
    print(f"{'when':<29} {'from':<36} {'to':<36} who / why")
    for e in entries:
        who = " ".join(
            part
            for part in (e.action and f"[{e.action}]", e.by, e.reason and f"({e.reason})")
            if part
        )
        print(
            f"{_when(e.created_at, milliseconds=True):<29} "
            f"{e.from_state or '-':<36} {e.to_state:<36} {printable(who)}"
        )
    return 0


def _cmd_step_action(args: argparse.Namespace) -> int:
    by = _operator(args.by)
    with _client() as client:
        if args.action == "retry":
            done = client.retry_step(args.task, args.step, by=by, reason=args.reason)
        elif args.action == "resolve":
            done = client.resolve_step(args.task, args.step, by=by, reason=args.reason)
        else:
            if hasattr(args, "result_file"):
                result = _read_json(args.result_file, "--result-file")
            else:
                result = args.result
            done = client.complete_step(
                args.task, args.step, result=result, by=by, reason=args.reason
            )
    if args.json:
        print_json(asdict(done))
        return 0
    print(
        f"step {args.step} of task {done.task_uuid}: {done.step_state}; the task is now "
        f"{done.task_state}"
    )
    return 0


def _cmd_templates_list(args: argparse.Namespace) -> int:
    with _client() as client:
        rows = client.templates(args.namespace)
    if args.json:
        print_json([asdict(r) for r in rows])
        return 0
    print(f"{'namespace':<20} {'name':<32} {'version':<16} {'steps':>5}  registered")
    for r in rows:
        print(
            f"{r.namespace[:20]:<20} {r.name[:32]:<32} {r.version[:16]:<16} {r.steps:>5}  "
            f"{_when(r.created_at)}"
        )
    if not rows:
        print("(no templates: workers register theirs when they start)")
    return 0


def _cmd_templates_show(args: argparse.Namespace) -> int:
    with _client() as client:
        template = client.template(args.namespace, args.name, args.version)
    if args.json:
        print_json(asdict(template))
        return 0
    config = template.configuration
    print(
        f"{template.namespace}/{template.name} {template.version}  "
        f"(identity: {template.identity_strategy})"
    )
    if config.get("description"):
        print(config["description"])
    print()
    print(f"{'step':<32} {'depends on':<40} {'attempts':>8}  retryable")
    for step in config.get("steps", []):
        depends = ", ".join(step.get("dependencies") or []) or "-"
        retry = step.get("retry") or {}
        print(
            f"{step['name'][:32]:<32} {depends[:40]:<40} {retry.get('max_attempts', '-')!s:>8}  "
            f"{'yes' if retry.get('retryable', True) else 'no'}"
        )
    return 0


# -- helpers -------------------------------------------------------------------------------------


class _UsageError(TaskerError):
    """A command line the command cannot use (exit 2)."""


def _guarded(handler: Handler) -> Handler:
    """Run ``handler``; a Tasker error is one ``tasker: error:`` line with its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except TaskerError as exc:
            print(f"tasker: error: {exc}", file=sys.stderr)
            return _error_code(exc)

    run.__doc__ = handler.__doc__
    return run


def _error_code(exc: TaskerError) -> int:
    if isinstance(exc, (_UsageError, InvalidFilterError, PayloadError)):
        return EXIT_USAGE
    if isinstance(
        exc, (TaskNotFoundError, StepNotFoundError, TemplateNotFoundError, DlqEntryNotFoundError)
    ):
        return EXIT_NOT_FOUND
    if isinstance(exc, TaskTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, DatabaseUnavailableError):
        return EXIT_DATABASE
    return EXIT_FAILED


@contextmanager
def _client() -> Iterator[Client]:
    from tasker.client import Client

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # -v shows the pool's retries
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    client = Client()
    try:
        yield client
    finally:
        client.close()


def _wait(client: Client, task: str, timeout: float, *, quiet: bool) -> TaskStatus:
    progress = _Progress(enabled=not quiet)
    try:
        poll = 0.5 if progress.live else 1.0
        return client.wait(task, timeout=timeout, poll_interval=poll, on_progress=progress.show)
    finally:
        progress.end()


class _Progress:
    """The progress line of a wait, on stderr: rewritten in place on a terminal, one line per
    change otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self._last = ""

    def show(self, status: TaskStatus) -> None:
        if not self.enabled:
            return
        done = sum(1 for s in status.steps if s.state in ("complete", "resolved_manually"))
        running = [
            f"{s.name} (attempt {s.attempts})" for s in status.steps if s.state == "in_progress"
        ]
        line = f"{status.state}: {done}/{len(status.steps)} steps done"
        if running:
            line += "; running: " + ", ".join(running[:3]) + (" ..." if len(running) > 3 else "")
        if line == self._last:
            return
        self._last = line
        if self.live:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.live and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _print_status(status: TaskStatus, as_json: bool) -> None:
    if as_json:
        data = asdict(status)
        data["finished"], data["blocked"] = status.finished, status.blocked
        print_json(data)
        return
    print(f"task      {status.task_uuid}")
    print(f"workflow  {status.namespace}/{status.name} {status.version}")
    state = status.state
    if status.blocked:
        state += " (waiting for you: tasker step retry|resolve|complete TASK STEP)"
    print(f"state     {state}")
    print(
        f"requested {_when(status.requested_at)}"
        + (f", finished {_when(status.completed_at)}" if status.completed_at else "")
    )
    asked = ", ".join(
        f"{label} {printable(value)}"
        for label, value in (
            ("by", status.initiator),
            ("from", status.source_system),
            ("because", status.reason),
        )
        if value
    )
    if asked:
        print(f"asked     {asked}")
    if status.tags:
        print(f"tags      {printable(json.dumps(status.tags, ensure_ascii=False))}")
    print()
    print(f"{'step':<28} {'state':<22} {'attempts':>8}  last error")
    for s in status.steps:
        error = ""
        if s.error and s.state not in ("complete",):
            error = f"{s.error.get('error_type', '')}: {s.error.get('message', '')}"
        elif s.waiting_for:
            error = f"(waiting: {s.waiting_for})"
        print(
            f"{s.name[:28]:<28} {s.state:<22} {s.attempts:>3}/{s.max_attempts:<4}  "
            f"{printable(error.splitlines()[0][:70]) if error else ''}"
        )


def _operator(by: str | None) -> str:
    if by is not None:
        return by
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without one)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _read_json(path: Path, option: str) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        return strict_json(text)
    except OSError as exc:
        raise _UsageError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise _UsageError(f"{option} {path}: not JSON ({exc})") from None


def _when(value: datetime | None, *, milliseconds: bool = False) -> str:
    """A time in the local zone, with its UTC offset (so every table says which zone)."""
    if value is None:
        return "-"
    spec = "milliseconds" if milliseconds else "seconds"
    return value.astimezone().isoformat(sep=" ", timespec=spec)

"""``tasker breakers``: the shared step breakers as PostgreSQL holds them, and closing one by hand.

The database breaker lives in each worker's memory (its logs, and the listeners of
:mod:`tasker.breakers.registry`, show it); only the step breakers have rows to show here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tasker.cli_output import jsonable, print_json
from tasker.exceptions import ConfigurationError

__all__ = ["add_breaker_commands"]

Handler = Callable[[argparse.Namespace], int]


def add_breaker_commands(commands: Any) -> None:
    """Add ``breakers`` (and ``breakers reset``) to the CLI's subcommands."""
    breakers = commands.add_parser(
        "breakers",
        help="list the step circuit breakers; reset one",
        description="Lists the circuit breakers that steps declare (@flow.step(breaker=...)), "
        "as every worker shares them in tasker.circuit_breakers. A breaker without a row never "
        "failed and is closed. See docs/operations.md, Circuit breakers.",
    )
    breakers.add_argument("--json", action="store_true", help="print JSON")
    breakers.set_defaults(handler=_cmd_breakers)
    sub = breakers.add_subparsers(title="breakers commands", metavar="COMMAND")
    reset = sub.add_parser(
        "reset",
        help="close a breaker now (workers see it within breakers.cache_ttl_s)",
    )
    reset.add_argument("name", type=_breaker_name, help="the breaker's name")
    reset.add_argument("--json", action="store_true", help="print the breaker as JSON")
    reset.set_defaults(handler=_cmd_breakers_reset)


def _cmd_breakers(args: argparse.Namespace) -> int:
    from tasker.breakers.shared import list_breakers

    with _connection() as conn:
        rows = list_breakers(conn)
    data = [jsonable(dataclasses.asdict(row)) for row in rows]
    if args.json:
        print_json(data)
    else:
        for line in _lines(data):
            print(line)
    return 0


def _cmd_breakers_reset(args: argparse.Namespace) -> int:
    from tasker.breakers.shared import list_breakers, reset_breaker

    with _connection() as conn:
        if not reset_breaker(conn, args.name):
            raise ConfigurationError(
                f"No circuit breaker {args.name!r} has a state to reset (it never failed, so it "
                "is closed); `tasker breakers` lists those that have one."
            )
        rows = list_breakers(conn, args.name)
    data = jsonable(dataclasses.asdict(rows[0]))
    if args.json:
        print_json(data)
    else:
        print(f"breaker {args.name} closed; workers see it within breakers.cache_ttl_s")
    return 0


def _lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no breaker has failed yet: every step breaker is closed)"]
    lines = [
        f"{'name':<24} {'state':<10} {'failures':>8} {'open for':>9} {'opened':>7}  last error"
    ]
    for row in rows:
        open_for = "" if row["open_for_s"] is None else f"{row['open_for_s']:.0f}s"
        lines.append(
            f"{row['name']:<24} {row['state']:<10} {row['failures']:>8} {open_for:>9} "
            f"{row['times_opened']:>7}  {row['last_error'] or ''}"
        )
    return lines


@contextmanager
def _connection() -> Iterator[Any]:
    import psycopg

    from tasker.db.connection import connect
    from tasker.db.errors import database_error
    from tasker.db.resolve import resolve_database_url
    from tasker.settings import load_settings

    url = resolve_database_url(load_settings().database)
    try:
        with connect(url) as conn:
            yield conn
    except psycopg.Error as exc:
        raise database_error(exc, url=url) from exc


def _breaker_name(value: str) -> str:
    """A step breaker's name; anything else is a usage error saying why."""
    from tasker.workflow.definition import breaker_name_problem

    problem = breaker_name_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value

"""Argument types of the ``tasker`` CLI: a bad number is an argparse usage error (exit code 2)
naming the option and the values it takes, never a traceback or a silently odd run.

Every whole number has an upper bound too: at most a PostgreSQL ``bigint`` (an id, a count sent
to SQL), and a sane one where a huge value can only be a typo (``-p 100000`` worker processes,
``--limit`` rows to print, seconds beyond a day).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

__all__ = [
    "INT64_MAX",
    "LIMIT_MAX",
    "PROCESSES_MAX",
    "REPLICAS_MAX",
    "SECONDS_MAX",
    "THREADS_MAX",
    "actor_text",
    "coordinator_interval",
    "int_range",
    "iso_datetime",
    "json_object",
    "json_value",
    "key_value",
    "limit",
    "msg_id",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "processes",
    "reason_text",
    "replicas",
    "seconds",
    "shutdown_seconds",
    "strict_json",
    "tcp_port",
    "threads",
    "wait_seconds",
]

#: PostgreSQL's ``bigint``: ids and counts beyond it cannot reach SQL.
INT64_MAX = 2**63 - 1
#: Rows a listing prints (``--limit``).
LIMIT_MAX = 100_000
#: Worker processes per ``tasker worker`` (or per pod).
PROCESSES_MAX = 256
#: Threads per worker process.
THREADS_MAX = 1024
#: Pods an autoscaler may run per Deployment.
REPLICAS_MAX = 1000
#: A day: the longest shutdown timeout or grace period.
SECONDS_MAX = 86_400


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:  # also past Python's 4300 digits
        raise argparse.ArgumentTypeError(f"must be a whole number, not {_shown(value)}") from None


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {_shown(value)}") from None


def int_range(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """The argument type of a whole number from ``low`` to ``high``; ``why`` (``"a day"``) says
    in the error what the upper bound is."""

    def parse(value: str) -> int:
        number = _int(value)
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {number}")
        if number > high:
            bound = f"{high} ({why})" if why else str(high)
            raise argparse.ArgumentTypeError(f"must be at most {bound}, not {number}")
        return number

    parse.__name__ = f"int_{low}_to_{high}"
    return parse


#: A whole number of at least 1 (counts, ids), at most a ``bigint``.
positive_int = int_range(1, INT64_MAX, "the largest bigint")
#: A whole number of at least 0, at most a ``bigint``.
non_negative_int = int_range(0, INT64_MAX, "the largest bigint")
#: A PGMQ ``msg_id``.
msg_id = int_range(1, INT64_MAX, "the largest msg_id, a bigint")
#: How many rows a listing prints.
limit = int_range(1, LIMIT_MAX)
#: Worker processes.
processes = int_range(1, PROCESSES_MAX)
#: Threads per worker process.
threads = int_range(1, THREADS_MAX)
#: Autoscaler bounds.
replicas = int_range(1, REPLICAS_MAX)
#: Whole seconds, 0 to a day.
seconds = int_range(0, SECONDS_MAX, "a day")


def non_negative_float(value: str) -> float:
    """A finite number, 0 or more."""
    number = _float(value)
    if not 0 <= number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {value}")
    return number


def shutdown_seconds(value: str) -> float:
    """Seconds that running handlers may take to finish: 0 to a day."""
    number = _float(value)
    if not 0 <= number <= SECONDS_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {SECONDS_MAX} (a day), not {value}"
        )
    return number


def wait_seconds(value: str) -> float:
    """Seconds to wait for something (``task wait --timeout``): more than 0, at most a week."""
    number = _float(value)
    if not 0 < number <= 7 * 86_400:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most 604800 (a week), not {value}"
        )
    return number


def tcp_port(value: str) -> int:
    """A TCP port to listen on, 0 to 65535 (0: any free port)."""
    number = _int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port from 0 to 65535 (0: any free one), not {number}"
        )
    return number


def coordinator_interval(value: str) -> float:
    """Seconds per coordinator cycle, checked like the setting ``coordinator.interval_s``."""
    from tasker.settings import number_problem

    number = _float(value)
    problem = number_problem("coordinator.interval_s", number)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem} (seconds per cycle)")
    return number


def strict_json(text: str) -> Any:
    """JSON as PostgreSQL's jsonb reads it: ``NaN``, ``Infinity`` and numbers too large for a
    float are refused (``ValueError``) instead of becoming values no JSON reader accepts."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def number(literal: str) -> float:
        value = float(literal)
        if math.isinf(value):
            raise ValueError(f"{literal} is too large for a JSON number")
        return value

    return json.loads(text, parse_constant=refuse, parse_float=number)


def json_value(value: str) -> Any:
    """Any JSON value (a result, a tag's value)."""
    try:
        return strict_json(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"must be JSON ({exc}); quote it for the shell: '{{\"key\": 1}}'"
        ) from None


def actor_text(value: str) -> str:
    """Who takes an action (``--by``): 1 to 128 characters, no control character."""
    if not value.strip() or len(value) > 128:
        raise argparse.ArgumentTypeError("must have 1 to 128 characters")
    if not value.isprintable():
        raise argparse.ArgumentTypeError("must not hold control characters (newlines, escapes)")
    return value


def reason_text(value: str) -> str:
    """Why an action was taken (``--reason``): at most 2000 characters, no NUL."""
    if len(value) > 2000 or "\x00" in value:
        raise argparse.ArgumentTypeError("must have at most 2000 characters, without NUL")
    return value


def json_object(value: str) -> dict[str, Any]:
    """A JSON object (a task context)."""
    parsed = json_value(value)
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"order_id\": 7}}', not {type(parsed).__name__}"
        )
    return parsed


def key_value(value: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the value is JSON when it parses as JSON, else the text."""
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, not {value!r}")
    try:
        return key, strict_json(text)
    except ValueError:
        return key, text


def iso_datetime(value: str) -> datetime:
    """An ISO 8601 date or time; without a zone, the local one."""
    try:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo is not None else parsed.astimezone()
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 date or time from year 1 to 9999 such as 2026-11-30 or "
            f"2026-11-30T14:00Z (without a zone: local time), not {value!r}"
        ) from None

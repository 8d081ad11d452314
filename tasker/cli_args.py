"""Argument types of the ``tasker`` CLI: a bad number is an argparse usage error (exit code 2)
naming the option and the values it takes, never a traceback or a silently odd run."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

__all__ = [
    "bounded_int",
    "coordinator_interval",
    "iso_datetime",
    "json_object",
    "json_value",
    "key_value",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "tcp_port",
]


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {value!r}") from None


def positive_int(value: str) -> int:
    """A whole number of at least 1 (counts, limits, ids)."""
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def non_negative_int(value: str) -> int:
    """A whole number of at least 0."""
    number = _int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {number}")
    return number


def non_negative_float(value: str) -> float:
    """A finite number of seconds, 0 or more."""
    number = _float(value)
    if not 0 <= number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value}")
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


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``."""

    def parse(value: str) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {number}")
        return number

    return parse


def json_value(value: str) -> Any:
    """Any JSON value (a result, a tag's value)."""
    try:
        return json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"must be JSON ({exc}); quote it for the shell: '{{\"key\": 1}}'"
        ) from None


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
        return key, json.loads(text)
    except ValueError:
        return key, text


def iso_datetime(value: str) -> datetime:
    """An ISO 8601 date or time; without a zone, the local one."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 date or time such as 2026-11-30 or 2026-11-30T14:00Z, "
            f"not {value!r}"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()

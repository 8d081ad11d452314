"""Argument types of the ``tasker`` CLI: a bad number is an argparse usage error (exit code 2)
naming the option and the values it takes, never a traceback or a silently odd run."""

from __future__ import annotations

import argparse
import math

__all__ = [
    "coordinator_interval",
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

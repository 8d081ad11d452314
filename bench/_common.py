"""Helpers shared by the benchmark scripts: local-only URLs, bounded waits, log scans, formats."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LOCAL_HOSTS = {None, "", "127.0.0.1", "localhost", "::1"}
ISSUE_PATTERN = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")


class BenchError(RuntimeError):
    """A phase could not complete (timeout, worker died, service refused)."""


def require_local(url: str, what: str) -> None:
    """Benchmarks only ever talk to this machine."""
    host = urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"{what} must point at 127.0.0.1 (got host {host!r}).")


def redact(url: str) -> str:
    """The URL with its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until true; raise BenchError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"Timed out after {timeout_s:.0f} s waiting for {what}.")
        time.sleep(interval_s)


def log_issues(path: Path, limit: int = 20) -> dict[str, Any]:
    """Warning/error lines of a worker log (and how many there were)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"count": 0, "lines": []}
    hits = [line for line in lines if ISSUE_PATTERN.search(line)]
    return {"count": len(hits), "lines": hits[:limit]}


def fmt(value: float | None, digits: int = 0) -> str:
    """A number for a table cell ('-' when missing)."""
    return "-" if value is None else f"{value:,.{digits}f}"


@contextlib.contextmanager
def rabbitmq_channel(url: str) -> Any:
    """A short-lived pika channel to the local RabbitMQ (fails fast when it is down)."""
    import pika

    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    connection = pika.BlockingConnection(params)
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def dramatiq_command(*modules: str, processes: int, threads: int, path: Path) -> list[str]:
    """``python -m dramatiq MODULES --processes P --threads T --path PATH``."""
    return [
        sys.executable,
        "-m",
        "dramatiq",
        *modules,
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--path",
        str(path),
    ]

"""``/metrics``, ``/health/live`` and ``/health/ready`` of a Tasker process, from a daemon thread.

One server for every process that serves them: ``tasker coordinator`` (its own registry) and the
``tasker worker`` supervisor (the metrics of its worker processes, read from their multiprocess
files). Each answers JSON on the probes; what *live* and *ready* mean is the caller's:

* ``live()`` returns ``(alive, detail)``; without it, a process that serves HTTP is alive;
* ``ready()`` returns ``(ready, detail)``; ``/health/ready`` (also ``/health``) answers 503 while
  not ready.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tasker.exceptions import ConfigurationError

__all__ = ["PATHS", "HealthServer", "Probe", "listen_error"]

#: ``() -> (ok, detail)``: the answer of a probe; ``detail`` goes into its JSON body.
Probe = Callable[[], tuple[bool, dict[str, Any]]]
PATHS = ("/metrics", "/health/live", "/health/ready")


def _always_alive() -> tuple[bool, dict[str, Any]]:
    return True, {}


class HealthServer:
    """Serves the registry's metrics and the two probes on ``host:port`` (0: any free port; the
    one chosen is :attr:`port`). Raises ``OSError`` when it cannot listen (see
    :func:`listen_error`)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Probe,
        *,
        live: Probe = _always_alive,
        host: str = "0.0.0.0",
        port: int,
    ) -> None:
        handler = _handler(registry, ready, live)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="tasker-health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def listen_error(exc: OSError, port: int, *, who: str, fix: str) -> ConfigurationError:
    """The :class:`ConfigurationError` for a port ``who`` could not listen on; ``fix`` names the
    option and setting that choose another (``pass --port ... or set coordinator.port``)."""
    if exc.errno == errno.EADDRINUSE:
        why = f"port {port} is in use (by another {who}?)"
    elif exc.errno == errno.EACCES:
        why = f"no permission to listen on port {port} (ports below 1024 need privileges)"
    else:
        why = f"cannot listen on port {port} ({exc.strerror or exc})"
    return ConfigurationError(f"{why}; {fix}")


def _handler(
    registry: CollectorRegistry, ready: Probe, live: Probe
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        _head_only = False  # HEAD: the status and headers of GET, without the body

        def do_HEAD(self) -> None:
            self._head_only = True
            self.do_GET()

        def do_GET(self) -> None:
            path = urlsplit(self.path).path  # a scrape's query parameters change nothing
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/health/live":
                ok, detail = live()
                self._json(200 if ok else 503, {"status": "alive" if ok else "dead", **detail})
            elif path in ("/health/ready", "/health"):
                ok, detail = ready()
                self._json(200 if ok else 503, {"status": "ready" if ok else "not ready", **detail})
            else:
                self._json(404, {"error": "not found", "paths": list(PATHS)})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self._head_only:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would flood the log

    return Handler

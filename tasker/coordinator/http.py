"""``/metrics``, ``/health/live`` and ``/health/ready`` of a coordinator process."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]


class HealthServer:
    """Serves the registry's metrics and two probes on ``host:port`` from a daemon thread.

    ``ready()`` returns ``(ready, detail)``; ``/health/ready`` answers 503 while not ready.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        host: str = "0.0.0.0",
        port: int,
    ) -> None:
        handler = _handler(registry, ready)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="tasker-health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(
    registry: CollectorRegistry, ready: Callable[[], tuple[bool, dict[str, Any]]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/health/live":
                self._json(200, {"status": "alive"})
            elif self.path in ("/health/ready", "/health"):
                ok, detail = ready()
                self._json(200 if ok else 503, {"status": "ready" if ok else "not ready", **detail})
            else:
                self._json(
                    404,
                    {"error": "not found", "paths": ["/metrics", "/health/live", "/health/ready"]},
                )

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would flood the log

    return Handler

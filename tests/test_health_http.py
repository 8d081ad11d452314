"""The HTTP server of /metrics and the probes (tasker/health_http.py), shared by `tasker worker`
and `tasker coordinator`: what a scrape config or a load balancer may send it."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from tasker.health_http import HealthServer


@pytest.fixture
def server() -> Iterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("tasker_test_things", "Things", registry=registry).inc()
    running = HealthServer(
        registry, lambda: (True, {"why": "ok"}), host="127.0.0.1", port=0
    ).start()
    yield running
    running.stop()


def _request(server: HealthServer, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path", ["/metrics?format=text", "/health/ready?verbose=1", "/health/live?", "/health?x#y"]
)
def test_query_strings_are_ignored(server: HealthServer, path: str) -> None:
    status, body = _request(server, "GET", path)
    assert status == 200 and body


def test_head_answers_like_get_without_a_body(server: HealthServer) -> None:
    for path in ("/metrics", "/health/ready", "/health/live"):
        assert _request(server, "HEAD", path) == (200, b"")
    assert _request(server, "HEAD", "/nope")[0] == 404


def test_metrics_and_unknown_paths(server: HealthServer) -> None:
    status, body = _request(server, "GET", "/metrics")
    assert status == 200 and b"tasker_test_things_total 1.0" in body
    status, body = _request(server, "GET", "/nope?x=1")
    assert status == 404 and b"/health/ready" in body

"""`tasker serve` as a user runs it: a process serving HTTP on a port it prints, refusing to start
in production without credentials, stopping cleanly on SIGTERM; and `tasker api openapi|docs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tasker
from tasker.api.app import openapi_document
from tasker.api.reference import END, START, render_reference, updated_document
from tests.support import wait_for

ROOT = Path(__file__).resolve().parent.parent
KEY = "serve-test-key-0123456789"


def _flow() -> tasker.Workflow:
    flow = tasker.Workflow("served", "hello", version="1.0.0", register=False)

    @flow.step()
    def greet(ctx: tasker.StepContext) -> str:
        return "hello"

    return flow


class Served:
    """A `tasker serve --port 0` process in its own process group (its log in a file, so a
    chatty server never blocks on a full pipe)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by the test)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasker.cli", "serve", "--port", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # ends when it prints its address, or exits
        if "http://" not in line:
            self.stop()
            raise AssertionError(f"tasker serve did not start: {line!r} {self.output()}")
        self.url = "http://" + line.split("http://", 1)[1].split()[0]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        """SIGTERM, then its exit code (it must stop within 60 s)."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER_")}
    return env | {"TASKER_DATABASE__URL": database_url, "TASKER_ENV": "test"} | extra


@pytest.fixture
def registered(database_url: str) -> str:
    with tasker.Client(url=database_url) as client:
        client.register(_flow())
    return database_url


@pytest.fixture
def production(registered: str) -> Iterator[Served]:
    served = Served(
        _env(
            registered,
            TASKER_ENV="production",
            TASKER_API__HOST="127.0.0.1",
            TASKER_API__AUTH__API_KEYS=f'[{{name="ci", key="{KEY}", permissions=["tasks:*"]}}]',
        )
    )
    yield served
    served.stop()
    served.log.close()


def test_serve_answers_http_and_stops_on_sigterm(registered: str) -> None:
    served = Served(_env(registered))
    try:
        with httpx.Client(base_url=served.url, timeout=10) as http:
            wait_for(lambda: http.get("/health/ready").status_code == 200, 30, "ready")
            created = http.post("/v1/tasks", json={"namespace": "served", "name": "hello"})
            assert created.status_code == 201, created.text
            task = http.get(f"/v1/tasks/{created.json()['task_uuid']}").json()
            assert task["state"] in ("pending", "steps_in_process") and task["steps"]
            assert "tasker_api_requests_total" in http.get("/metrics").text
            assert http.get("/api-docs/openapi.json").json()["info"]["title"] == "Tasker API"
    finally:
        code = served.stop()
        output = served.output()
        served.log.close()
    assert code == 0, output


def test_production_serves_only_with_a_key(production: Served) -> None:
    with httpx.Client(base_url=production.url, timeout=10) as http:
        body = {"namespace": "served", "name": "hello"}
        refused = http.post("/v1/tasks", json=body)
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        created = http.post("/v1/tasks", json=body, headers={"X-API-Key": KEY})
        assert created.status_code == 201, created.text
        denied = http.get("/v1/templates", headers={"X-API-Key": KEY})
        assert denied.status_code == 403 and "templates:read" in denied.json()["detail"]
        assert http.get("/health/live").status_code == 200  # probes need no key


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, "api.auth"),
        ({"TASKER_API__AUTH__JWT_SECRET": "zq-tiny-secret"}, "jwt_secret"),
        ({"TASKER_API__AUTH__API_KEYS": '[{name="x", key="zq-tiny-key"}]'}, "api_keys"),
        (
            {
                "TASKER_API__AUTH__API_KEYS": (
                    '[{name="x", key="k-0123456789abcdef", permissions=["task:read"]}]'
                )
            },
            "permissions",
        ),
    ],
)
def test_production_refuses_to_start_without_usable_credentials(
    database_url: str, extra: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tasker.cli", "serve", "--port", "0"],
        env=_env(database_url, TASKER_ENV="production", **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result
    assert "tasker: error:" in result.stderr and expected in result.stderr
    for secret in ("zq-tiny-secret", "zq-tiny-key", "k-0123456789abcdef"):
        assert secret not in result.stderr


def test_production_authenticates_whatever_settings_file_is_used(
    database_url: str, tmp_path: Path
) -> None:
    """A settings file of one's own that says nothing of authentication (or only a JWT secret
    too short to use) leaves it on in production: the API refuses to start."""
    cases = {
        "threads.toml": "[production.api]\nthreads = 10\n",
        "secret.toml": '[production.api.auth]\njwt_secret = "zq-short-secret"\n',
        "empty.toml": "",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "tasker.cli", "--settings", str(path), "serve", "--port", "0"],
            env=_env(database_url, TASKER_ENV="production"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert "api.auth" in result.stderr and "zq-short-secret" not in result.stderr


def test_a_taken_port_is_a_clear_error(registered: str) -> None:
    served = Served(_env(registered))
    try:
        port = served.url.rsplit(":", 1)[1]
        result = subprocess.run(
            [sys.executable, "-m", "tasker.cli", "serve", "--port", port],
            env=_env(registered),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert f"port {port} is in use" in result.stderr and "--port" in result.stderr
    finally:
        served.stop()
        served.log.close()


def test_the_settings_command_masks_api_secrets() -> None:
    env = _env(
        "postgresql://u@127.0.0.1/x",
        TASKER_API__AUTH__JWT_SECRET="a-jwt-secret-of-at-least-32-bytes-long",
        TASKER_API__AUTH__API_KEYS='[{name="ci", key="very-secret-key-0001"}]',
    )
    result = subprocess.run(
        [sys.executable, "-m", "tasker.cli", "settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "very-secret-key-0001" not in result.stdout
    assert "a-jwt-secret-of-at-least-32-bytes-long" not in result.stdout
    assert json.loads(result.stdout)["api"]["auth"]["api_keys"][0]["name"] == "ci"


def test_openapi_command_prints_the_served_document(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    subprocess.run(
        [sys.executable, "-m", "tasker.cli", "api", "openapi", "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(openapi_document()))


def test_docs_api_md_is_generated_from_the_openapi_document() -> None:
    """docs/api.md's reference is what `tasker api docs` writes: regenerate it with that command
    after changing an endpoint or a model."""
    path = ROOT / "docs" / "api.md"
    current = path.read_text(encoding="utf-8")
    assert START in current and END in current
    wanted = updated_document(current, render_reference(openapi_document()))
    assert current == wanted, "docs/api.md is out of date: run `tasker api docs`"


def test_the_reference_lists_every_endpoint_with_its_permission() -> None:
    document = openapi_document()
    reference = render_reference(document)
    for path, item in document["paths"].items():
        for method in item:
            assert f"`{method.upper()} {path}`" in reference
    assert "Permission: `tasks:create`" in reference
    assert "Permission: none" in reference  # the probes

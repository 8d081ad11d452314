"""The HTTP API (tasker.api) against real PostgreSQL: every endpoint, its errors as problem+json,
the permission matrix, namespace scoping, the body limit and backpressure.

Requests go through Litestar's TestClient (the ASGI app in-process, handlers in threads, as under
uvicorn); `tasker serve` itself is tested in tests/test_api_serve.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jwt
import msgspec
import pytest
from litestar.testing import TestClient

import tasker
from tasker.api.app import create_app
from tasker.settings import (
    ApiAuthSettings,
    ApiKey,
    ApiSettings,
    DatabaseSettings,
    Settings,
)
from tests.support import InProcessFlows, age_task, scalar

SECRET = "an HS256 secret of at least 32 bytes, for tests"
ADMIN = "admin-key-0123456789"
BILLING = "billing-key-0123456789"
NOWHERE = "nowhere-key-0123456789"
PROBLEM = "application/problem+json"


def _flow(namespace: str = "shop", name: str = "order", *, fail: bool = False) -> tasker.Workflow:
    flow = tasker.Workflow(namespace, name, version="1.0.0", register=False)

    @flow.step()
    def validate(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"ok": True}

    @flow.step(depends_on=["validate"])
    def charge(ctx: tasker.StepContext) -> dict[str, Any]:
        if fail:
            raise tasker.PermanentError("card declined")
        return {"charged": ctx.task_context.get("amount", 0)}

    return flow


def _settings(url: str, **api: Any) -> Settings:
    auth = api.pop("auth", ApiAuthSettings())
    return Settings(
        env="test",
        database=DatabaseSettings(url=url),
        api=ApiSettings(auth=auth, **api),
    )


def _auth(*keys: ApiKey, **jwt_settings: Any) -> ApiAuthSettings:
    return ApiAuthSettings(enabled=True, api_keys=list(keys), **jwt_settings)


def _key(key: str, permissions: list[str], namespaces: list[str] | None = None) -> ApiKey:
    return ApiKey(name=f"name-{key}", key=key, permissions=permissions, namespaces=namespaces)


@pytest.fixture
def api(flows: InProcessFlows, database_url: str) -> Iterator[TestClient[Any]]:
    """The API without authentication, on the in-process worker's database."""
    flows.start(_flow(), _flow(fail=True, name="failing"))
    app = create_app(_settings(database_url), client=flows.client)
    with TestClient(app) as client:
        yield client


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["title"] and body["detail"]
    return body


def _settled(api: TestClient[Any], task: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get(f"/v1/tasks/{task}").json()
        if body["settled"] or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


# -- tasks -----------------------------------------------------------------------------------


def test_a_task_created_over_http_runs_and_reads_back(api: TestClient[Any]) -> None:
    created = api.post(
        "/v1/tasks",
        json={"namespace": "shop", "name": "order", "context": {"amount": 12}, "tags": {"t": 1}},
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["created"] is True and task["version"] == "1.0.0"

    body = _settled(api, task["task_uuid"])
    assert body["state"] == "complete", body["steps"]
    assert body["finished"] and body["settled"]
    assert body["context"] == {"amount": 12} and body["tags"] == {"t": 1}
    assert body["total_steps"] == 2 and body["completion_percentage"] == 100.0
    assert [s["name"] for s in body["steps"]] == ["validate", "charge"]
    assert body["steps"][1]["result"] == {"charged": 12}

    steps = api.get(f"/v1/tasks/{task['task_uuid']}/workflow_steps").json()
    assert [s["state"] for s in steps] == ["complete", "complete"]
    by_name = api.get(f"/v1/tasks/{task['task_uuid']}/workflow_steps/charge").json()
    by_id = api.get(f"/v1/tasks/{task['task_uuid']}/workflow_steps/{by_name['step_uuid']}")
    assert by_id.json() == by_name and by_name["depends_on"] == ["validate"]
    audit = api.get(f"/v1/tasks/{task['task_uuid']}/workflow_steps/charge/audit").json()
    assert audit[0]["to_state"] == "complete"  # newest first
    assert api.get(f"/v1/tasks/{task['task_uuid']}/audit").json()[0]["to_state"] == "complete"


def test_an_idempotency_key_returns_the_first_task_and_refuses_another_context(
    api: TestClient[Any],
) -> None:
    body = {"namespace": "shop", "name": "order", "context": {"a": 1}, "idempotency_key": "k-1"}
    first = api.post("/v1/tasks", json=body)
    again = api.post("/v1/tasks", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["task_uuid"] == first.json()["task_uuid"]
    assert again.json()["created"] is False
    conflict = api.post("/v1/tasks", json={**body, "context": {"a": 2}})
    _problem(conflict, 409, "idempotency_conflict")


def test_listing_filters_pages_and_refuses_bad_filters(api: TestClient[Any]) -> None:
    tasks = [
        api.post(
            "/v1/tasks", json={"namespace": "shop", "name": "order", "context": {"n": n}}
        ).json()["task_uuid"]
        for n in range(3)
    ]
    for task in tasks:
        _settled(api, task)
    first = api.get("/v1/tasks", params={"namespace": "shop", "limit": 2}).json()
    assert [t["task_uuid"] for t in first["tasks"]] == tasks[::-1][:2]  # newest first
    rest = api.get(
        "/v1/tasks", params={"namespace": "shop", "limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert [t["task_uuid"] for t in rest["tasks"]] == [tasks[0]] and rest["next_cursor"] is None
    by_state = api.get("/v1/tasks", params={"state": ["complete", "error"]}).json()
    assert {t["state"] for t in by_state["tasks"]} == {"complete"}
    assert api.get("/v1/tasks", params={"namespace": "nowhere"}).json()["tasks"] == []

    for params, field in (
        ({"state": "done"}, None),
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"cursor": "not-a-cursor"}, None),
        ({"tag": "novalue"}, None),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, None),
    ):
        problem = _problem(api.get("/v1/tasks", params=params), 400, "invalid_request")
        if field is not None:
            assert [e["field"] for e in problem["errors"]] == [field], problem


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "order"}, "namespace"),
        ({"namespace": "shop"}, "name"),
        ({"namespace": "shop", "name": "order", "context": []}, "context"),
        ({"namespace": "shop", "name": "order", "priority": 101}, "priority"),
        ({"namespace": "shop", "name": "order", "priority": "high"}, "priority"),
        ({"namespace": "", "name": "order"}, "namespace"),
        ({"namespace": "shop", "name": "order", "colour": "red"}, "colour"),
        ({"namespace": "shop", "name": "order", "tags": "a"}, "tags"),
    ],
)
def test_a_body_that_does_not_fit_the_schema_gets_400_naming_the_field(
    api: TestClient[Any], body: dict[str, Any], field: str
) -> None:
    problem = _problem(api.post("/v1/tasks", json=body), 400, "invalid_request")
    assert field in [e["field"] for e in problem["errors"]] or field in problem["detail"], problem


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'"text"',
        b"",
        b'{"namespace": "shop", "name": "order", "context": {"a": "\\u0000"}}',
    ],
)
def test_a_body_that_is_not_a_task_request_gets_400(api: TestClient[Any], content: bytes) -> None:
    response = api.post("/v1/tasks", content=content, headers={"content-type": "application/json"})
    _problem(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "content",
    [
        b'{"namespace": "shop", "name": "order", "context": {"a": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}}",
        b'{"namespace": "shop", "name": "order", "context": '
        + b'{"a": ' * 3000
        + b"1"
        + b"}" * 3001,
        b'{"namespace": "shop", "name": "order", "tags": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"[" * 20000 + b"]" * 20000,
    ],
    ids=["lists-1000", "objects-3000", "tags-5000", "body-20000"],
)
def test_a_body_nested_too_deeply_gets_400(api: TestClient[Any], content: bytes) -> None:
    response = api.post("/v1/tasks", content=content, headers={"content-type": "application/json"})
    _problem(response, 400, "invalid_request")


def test_bodies_with_unknown_fields_or_oversized_tags_get_400(api: TestClient[Any]) -> None:
    task = api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).json()["task_uuid"]
    path = f"/v1/tasks/{task}/workflow_steps/charge"
    for body in (
        {"action_type": "resolve_manually", "extra": 1},
        {"action_type": "reset_for_retry", "reset_by_typo": "bob"},
        {"action_type": "complete_manually", "completion_data": {"result": 1}, "completed_by_x": 1},
        {"action_type": "complete_manually", "completion_data": {"result": 1, "meta": {}}},
    ):
        problem = _problem(api.patch(path, json=body), 400, "invalid_request")
        assert "unknown field" in problem["detail"], problem
    big_tags = {"namespace": "shop", "name": "order", "tags": {"t": "x" * 20_000}}
    problem = _problem(api.post("/v1/tasks", json=big_tags), 400, "invalid_request")
    assert "tags" in problem["detail"]
    many_tags = {"namespace": "shop", "name": "order", "tags": {str(n): n for n in range(5000)}}
    _problem(api.post("/v1/tasks", json=many_tags), 400, "invalid_request")
    empty = api.post("/v1/tasks", content=b"", headers={"content-type": "application/json"})
    assert _problem(empty, 400, "invalid_request")["errors"][0]["field"] == "body"
    bad_state = _problem(api.get("/v1/tasks", params={"state": "bogus"}), 400, "invalid_request")
    assert bad_state["errors"][0]["field"] == "state"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        None,
    ],
)
def test_a_body_not_declared_json_gets_415(api: TestClient[Any], content_type: str | None) -> None:
    """A browser sends text and form bodies cross-origin without asking first: refused."""
    body = b'{"namespace": "shop", "name": "order"}'
    headers = {"content-type": content_type} if content_type else {}
    response = api.post("/v1/tasks", content=body, headers=headers)
    _problem(response, 415, "unsupported_media_type")
    task = api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).json()["task_uuid"]
    patch = api.patch(
        f"/v1/tasks/{task}/workflow_steps/charge",
        content=b'{"action_type": "resolve_manually"}',
        headers=headers,
    )
    _problem(patch, 415, "unsupported_media_type")
    for declared in ("application/json; charset=utf-8", "application/problem+json"):
        accepted = api.post("/v1/tasks", content=body, headers={"content-type": declared})
        assert accepted.status_code == 201, (declared, accepted.text)


def test_unknown_things_get_404(api: TestClient[Any]) -> None:
    missing = "01900000-0000-7000-8000-000000000000"
    _problem(api.get(f"/v1/tasks/{missing}"), 404, "task_not_found")
    _problem(api.get("/v1/tasks/not-a-uuid"), 404, "task_not_found")
    _problem(api.delete(f"/v1/tasks/{missing}"), 404, "task_not_found")
    _problem(
        api.post("/v1/tasks", json={"namespace": "shop", "name": "nothing"}),
        404,
        "template_not_found",
    )
    task = api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).json()["task_uuid"]
    _problem(api.get(f"/v1/tasks/{task}/workflow_steps/nope"), 404, "step_not_found")
    _problem(api.get("/v1/templates/shop/order/9.9.9"), 404, "template_not_found")
    _problem(api.get(f"/v1/dlq/entry/{missing}"), 404, "dlq_entry_not_found")
    _problem(api.get("/v1/no/such/route"), 404, "not_found")
    _problem(api.put("/v1/tasks"), 405, "method_not_allowed")


def test_cancel_over_http_and_a_second_cancel_is_a_conflict(
    flows: InProcessFlows, api: TestClient[Any]
) -> None:
    flows.stop()  # nothing runs: the task stays cancellable
    task = api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).json()["task_uuid"]
    cancelled = api.delete(f"/v1/tasks/{task}", params={"reason": "customer withdrew"})
    assert cancelled.status_code == 200, cancelled.text
    assert (
        cancelled.json()["state"] == "cancelled" and len(cancelled.json()["cancelled_steps"]) == 2
    )
    _problem(api.delete(f"/v1/tasks/{task}"), 409, "action_not_allowed")
    entry = api.get(f"/v1/tasks/{task}/audit").json()[0]
    assert (entry["action"], entry["by"], entry["reason"]) == (
        "cancel",
        "anonymous",
        "customer withdrew",
    )


def test_the_three_manual_step_actions(api: TestClient[Any], flows: InProcessFlows) -> None:
    def blocked() -> str:
        created = api.post("/v1/tasks", json={"namespace": "shop", "name": "failing"})
        task: str = created.json()["task_uuid"]
        assert _settled(api, task)["state"] == "blocked_by_failures"
        return task

    task = blocked()
    path = f"/v1/tasks/{task}/workflow_steps/charge"
    done = api.patch(
        path,
        json={
            "action_type": "complete_manually",
            "completion_data": {"result": {"charged": 5}},
            "reason": "charged by phone",
            "completed_by": "ops@example.com",
        },
    )
    assert done.status_code == 200, done.text
    assert done.json()["step_state"] == "complete" and done.json()["reopened"] is True
    assert _settled(api, task)["state"] == "complete"
    assert api.get(path).json()["result"] == {"charged": 5}
    assert api.get(f"{path}/audit").json()[0]["by"] == "ops@example.com"

    task = blocked()
    resolved = api.patch(
        f"/v1/tasks/{task}/workflow_steps/charge",
        json={"action_type": "resolve_manually", "reason": "written off"},
    )
    assert resolved.json()["step_state"] == "resolved_manually", resolved.text
    assert _settled(api, task)["state"] == "complete"

    task = blocked()
    path = f"/v1/tasks/{task}/workflow_steps/charge"
    _problem(
        api.patch(path, json={"action_type": "reset_for_retry", "reason": "x", "reset_by": ""}),
        400,
        "invalid_request",
    )
    retried = api.patch(path, json={"action_type": "reset_for_retry", "reason": "card fixed"})
    assert retried.status_code == 200 and retried.json()["action"] == "retry", retried.text
    assert _settled(api, task)["state"] == "blocked_by_failures"  # it fails again
    validate = f"/v1/tasks/{task}/workflow_steps/validate"
    _problem(
        api.patch(validate, json={"action_type": "reset_for_retry"}), 409, "action_not_allowed"
    )
    for bad in (
        {"action_type": "explode"},
        {},
        {"action_type": "complete_manually"},
    ):
        _problem(api.patch(path, json=bad), 400, "invalid_request")
    lone_surrogate = (
        b'{"action_type": "complete_manually", "completion_data": {"result": "\\udc80"}}'
    )
    response = api.patch(path, content=lone_surrogate, headers={"content-type": "application/json"})
    _problem(response, 400, "invalid_request")


def test_templates_dlq_and_health(api: TestClient[Any], database_url: str) -> None:
    templates = api.get("/v1/templates").json()
    assert {(t["namespace"], t["name"]) for t in templates} >= {
        ("shop", "order"),
        ("shop", "failing"),
    }
    assert api.get("/v1/templates", params={"namespace": "nowhere"}).json() == []
    latest = api.get("/v1/templates/shop/order").json()
    assert latest["version"] == "1.0.0" and latest["configuration"]["steps"]
    assert api.get("/v1/templates/shop/order/1.0.0").json() == latest

    assert api.get("/v1/dlq").json() == [] and api.get("/v1/dlq/stats").json() == []
    _problem(api.get("/v1/dlq", params={"resolution_status": "lost"}), 400, "invalid_request")

    assert api.get("/health/live").json() == {"status": "alive"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["database"]["status"] == "ok"
    health = api.get("/health").json()
    assert health["status"] == "healthy" and health["checks"]["queues"]["accepting_tasks"]
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and "tasker_api_requests_total" in metrics.text
    assert "tasker_tasks_created_total" in metrics.text or "tasker_api" in metrics.text
    schema = api.get("/api-docs/openapi.json").json()
    assert schema["openapi"].startswith("3.1") and "/v1/tasks" in schema["paths"]
    ui = api.get("/api-docs")
    assert ui.status_code == 200 and "swagger" in ui.text.lower()


def test_dlq_entries_over_http(api: TestClient[Any], flows: InProcessFlows) -> None:
    from tasker.coordinator.loop import Coordinator
    from tasker.settings import CoordinatorSettings, StalenessSettings

    created = api.post("/v1/tasks", json={"namespace": "shop", "name": "failing"})
    task = created.json()["task_uuid"]
    assert _settled(api, task)["state"] == "blocked_by_failures"
    age_task(flows.url, task, minutes=5)  # blocked for longer than its limit
    config = CoordinatorSettings(
        recovery_grace_s=0, staleness=StalenessSettings(blocked_by_failures_minutes=1)
    )
    coordinator = Coordinator(flows.broker, config, name="api-test")
    try:
        assert coordinator.cycle().dead_lettered == [task]
    finally:
        coordinator.close()
    entries = api.get(f"/v1/dlq/task/{task}").json()
    assert len(entries) == 1 and entries[0]["dlq_reason"] == "max_retries_exceeded", entries
    entry = entries[0]["dlq_entry_uuid"]
    assert api.get("/v1/dlq").json()[0]["dlq_entry_uuid"] == entry
    assert api.get(f"/v1/dlq/entry/{entry}").json()["task_snapshot"]
    stats = api.get("/v1/dlq/stats").json()
    assert stats[0]["entries"] == 1 and stats[0]["resolution_status"] == "pending"
    _problem(
        api.patch(f"/v1/dlq/entry/{entry}", json={"resolution_status": "forgotten"}),
        400,
        "invalid_request",
    )
    resolved = api.patch(
        f"/v1/dlq/entry/{entry}",
        json={"resolution_status": "permanently_failed", "resolution_notes": "refunded"},
    )
    assert resolved.json()["resolution_status"] == "permanently_failed", resolved.text
    assert resolved.json()["resolved_by"] == "anonymous"
    _problem(
        api.patch(f"/v1/dlq/entry/{entry}", json={"resolution_status": "cancelled"}),
        404,
        "dlq_entry_not_found",
    )
    assert (
        api.get("/v1/dlq", params={"resolution_status": "all"}).json()[0]["dlq_entry_uuid"] == entry
    )


# -- body limit and backpressure -------------------------------------------------------------


def test_a_body_over_the_limit_gets_413(flows: InProcessFlows, database_url: str) -> None:
    flows.register(_flow())
    app = create_app(_settings(database_url, max_body_bytes=4096), client=flows.client)
    with TestClient(app) as api:
        big = {"namespace": "shop", "name": "order", "context": {"blob": "x" * 5000}}
        _problem(api.post("/v1/tasks", json=big), 413, "body_too_large")
        patch = {"action_type": "complete_manually", "completion_data": {"result": "x" * 5000}}
        task = api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).json()
        path = f"/v1/tasks/{task['task_uuid']}/workflow_steps/charge"
        _problem(api.patch(path, json=patch), 413, "body_too_large")
        assert api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}).status_code == 201


def test_deep_queues_get_503_with_retry_after_until_they_drain(
    flows: InProcessFlows, database_url: str
) -> None:
    flows.register(_flow())  # no worker runs: step messages stay queued
    settings = _settings(
        # every request reads the depth (0 s between readings; settings allow 0.1 at least)
        database_url,
        max_queue_depth=3,
        backpressure_check_s=0.0,
        queue_retry_after_s=42,
    )
    app = create_app(settings, client=flows.client)
    body = {"namespace": "shop", "name": "order"}
    with TestClient(app) as api:
        accepted = 0
        for _ in range(10):
            response = api.post("/v1/tasks", json=body)
            if response.status_code == 503:
                break
            accepted += 1
        problem = _problem(response, 503, "backpressure")
        assert response.headers["retry-after"] == "42"
        assert "api.max_queue_depth" in problem["detail"]
        assert accepted == 4  # the depth read 3 (allowed), then 4
        assert api.get("/health").json()["checks"]["queues"]["accepting_tasks"] is False
        assert api.get("/v1/tasks?limit=1").status_code == 200  # reads are still served

        flows.start()  # the worker drains the queue
        deadline = time.monotonic() + 30
        while api.post("/v1/tasks", json=body).status_code == 503:
            assert time.monotonic() < deadline, "backpressure did not lift"
            time.sleep(0.1)


@pytest.mark.slow
def test_a_stopped_database_gets_503_with_retry_after(private_postgres: Any) -> None:
    from tests.conftest import migrate  # noqa: F401 - the private server's schema

    url = private_postgres.create_database("tasker")
    from tasker.db.migrate import migrate as apply

    apply(url)
    client = tasker.Client(url=url, timeout_s=1)
    client.register(_flow())
    app = create_app(_settings(url, database_retry_after_s=7), client=client)
    try:
        with TestClient(app) as api:
            body = {"namespace": "shop", "name": "order"}
            assert api.post("/v1/tasks", json=body).status_code == 201
            private_postgres.stop()
            port = str(private_postgres.port)
            for response in (
                api.post("/v1/tasks", json=body),
                api.get("/v1/tasks"),
                api.get("/v1/templates"),
            ):
                problem = _problem(response, 503, "database_unavailable")
                assert response.headers["retry-after"] == "7"
                assert port not in problem["detail"], "the database's address is not public"
            ready = api.get("/health/ready")
            assert ready.status_code == 503 and port not in ready.text
            assert api.get("/health/live").status_code == 200
            private_postgres.start()
            deadline = time.monotonic() + 30
            while api.post("/v1/tasks", json=body).status_code != 201:
                assert time.monotonic() < deadline, "the API did not recover"
                time.sleep(0.2)
    finally:
        client.close()


# -- authentication, permissions and namespaces ---------------------------------------------

#: Every endpoint with the permission it needs and a request that reaches it.
ENDPOINTS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("tasks:create", "POST", "/v1/tasks", {"namespace": "shop", "name": "order"}),
    ("tasks:list", "GET", "/v1/tasks", None),
    ("tasks:read", "GET", "/v1/tasks/{task}", None),
    ("tasks:read", "GET", "/v1/tasks/{task}/audit", None),
    ("tasks:cancel", "DELETE", "/v1/tasks/{task}", None),
    ("steps:read", "GET", "/v1/tasks/{task}/workflow_steps", None),
    ("steps:read", "GET", "/v1/tasks/{task}/workflow_steps/charge", None),
    ("steps:read", "GET", "/v1/tasks/{task}/workflow_steps/charge/audit", None),
    (
        "steps:resolve",
        "PATCH",
        "/v1/tasks/{task}/workflow_steps/charge",
        {"action_type": "resolve_manually"},
    ),
    ("templates:read", "GET", "/v1/templates", None),
    ("templates:read", "GET", "/v1/templates/shop/order", None),
    ("dlq:read", "GET", "/v1/dlq", None),
    ("dlq:read", "GET", "/v1/dlq/task/{task}", None),
    ("dlq:read", "GET", "/v1/dlq/entry/01900000-0000-7000-8000-000000000000", None),
    ("dlq:stats", "GET", "/v1/dlq/stats", None),
    (
        "dlq:update",
        "PATCH",
        "/v1/dlq/entry/01900000-0000-7000-8000-000000000000",
        {"resolution_status": "cancelled"},
    ),
]
ALL_PERMISSIONS = sorted({permission for permission, *_ in ENDPOINTS})


@pytest.fixture
def secured(flows: InProcessFlows, database_url: str) -> Iterator[tuple[TestClient[Any], str]]:
    """The API with authentication on (API keys per permission, HS256 JWTs), and a task of
    namespace shop that nothing runs."""
    flows.register(_flow(), _flow(namespace="billing", name="invoice"))
    keys = [_key(ADMIN, ["*:*"]), _key(BILLING, ["*:*"], ["billing"]), _key(NOWHERE, ["*:*"], [])]
    keys += [_key(f"only-{p}-0123456789", [p]) for p in ALL_PERMISSIONS]
    keys += [
        _key(f"all-but-{p}-0123456789", [q for q in ALL_PERMISSIONS if q != p])
        for p in ALL_PERMISSIONS
    ]
    auth = _auth(*keys, jwt_secret=SECRET, jwt_issuer="tests")
    app = create_app(_settings(database_url, auth=auth), client=flows.client)
    with TestClient(app) as api:
        created = api.post(
            "/v1/tasks",
            json={"namespace": "shop", "name": "order"},
            headers={"X-API-Key": ADMIN},
        )
        yield api, created.json()["task_uuid"]


def _call(api: TestClient[Any], endpoint: tuple[str, str, str, Any], task: str, **kw: Any) -> Any:
    _, method, path, body = endpoint
    return api.request(method, path.format(task=task), json=body, **kw)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e[1]} {e[2]}")
def test_each_endpoint_needs_its_permission(
    secured: tuple[TestClient[Any], str], endpoint: tuple[str, str, str, Any]
) -> None:
    api, task = secured
    permission = endpoint[0]
    allowed = _call(api, endpoint, task, headers={"X-API-Key": f"only-{permission}-0123456789"})
    assert allowed.status_code not in (401, 403), allowed.text
    denied = _call(api, endpoint, task, headers={"X-API-Key": f"all-but-{permission}-0123456789"})
    problem = _problem(denied, 403, "permission_denied")
    assert permission in problem["detail"]
    bearer = _call(
        api, endpoint, task, headers={"Authorization": f"Bearer only-{permission}-0123456789"}
    )
    assert bearer.status_code not in (401, 403), bearer.text
    missing = _call(api, endpoint, task)
    _problem(missing, 401, "unauthenticated")
    assert "Bearer" in missing.headers["www-authenticate"]


def _token(**claims: Any) -> str:
    payload = {"sub": "svc", "iss": "tests", "exp": int(time.time()) + 300} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET, "HS256")


def test_jwts_are_checked(secured: tuple[TestClient[Any], str]) -> None:
    api, task = secured

    def get(token: str) -> Any:
        return api.get(f"/v1/tasks/{task}", headers={"Authorization": f"Bearer {token}"})

    assert get(_token(permissions=["tasks:read"])).status_code == 200
    assert get(_token(permissions="tasks:read steps:read")).status_code == 200
    _problem(get(_token(permissions=["tasks:list"])), 403, "permission_denied")
    for bad in (
        _token(permissions=["*:*"], exp=int(time.time()) - 3600),  # expired
        _token(permissions=["*:*"], exp=None),  # no expiry
        _token(permissions=["*:*"], iss="someone-else"),
        _token(permissions=["*:*"])[:-4] + "AAAA",  # badly signed
        jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "iss": "tests"}, "x" * 40, "HS256"),
        "not.a.jwt",
        jwt.encode({"sub": "x", "iss": "tests", "permissions": ["*:*"]}, None, "none"),
    ):
        problem = _problem(get(bad), 401, "unauthenticated")
        assert bad not in problem["detail"]
    _problem(
        api.get("/v1/tasks", headers={"X-API-Key": "wrong-key-0123456789"}), 401, "unauthenticated"
    )
    for claims in (
        {"sub": "a\x00b", "permissions": ["*:*"]},
        {"sub": 7, "permissions": ["*:*"]},
        {"permissions": ["*:*"], "namespaces": ["\x00"]},
        {"permissions": ["tasks:read", 3]},
    ):
        _problem(get(_token(**claims)), 401, "unauthenticated")
    # probes, metrics and the OpenAPI document need no credentials
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/api-docs/openapi.json"):
        assert api.get(path).status_code == 200, path


def test_a_scoped_key_or_token_sees_only_its_namespaces(
    secured: tuple[TestClient[Any], str],
) -> None:
    api, shop_task = secured
    billing = {"X-API-Key": BILLING}
    own = api.post("/v1/tasks", json={"namespace": "billing", "name": "invoice"}, headers=billing)
    assert own.status_code == 201, own.text
    own_task = own.json()["task_uuid"]
    assert api.get(f"/v1/tasks/{own_task}", headers=billing).status_code == 200
    listed = api.get("/v1/tasks", headers=billing).json()["tasks"]
    assert [t["task_uuid"] for t in listed] == [own_task]
    assert api.get("/v1/tasks", params={"namespace": "shop"}, headers=billing).json()["tasks"] == []
    assert {t["namespace"] for t in api.get("/v1/templates", headers=billing).json()} == {"billing"}

    for endpoint in ENDPOINTS:
        if "{task}" in endpoint[2] or endpoint[2].startswith("/v1/templates/shop"):
            response = _call(api, endpoint, shop_task, headers=billing)
            assert response.status_code == 404, (endpoint, response.text)
    _problem(
        api.post("/v1/tasks", json={"namespace": "shop", "name": "order"}, headers=billing),
        404,
        "template_not_found",
    )
    nowhere = {"X-API-Key": NOWHERE}  # namespaces = []: none
    assert api.get("/v1/tasks", headers=nowhere).json()["tasks"] == []
    _problem(api.get(f"/v1/tasks/{own_task}", headers=nowhere), 404, "task_not_found")
    empty = {"Authorization": f"Bearer {_token(permissions=['*:*'], namespaces=[])}"}
    _problem(api.get(f"/v1/tasks/{own_task}", headers=empty), 404, "task_not_found")
    token = _token(permissions=["*:*"], namespaces=["billing"])
    scoped = {"Authorization": f"Bearer {token}"}
    _problem(api.get(f"/v1/tasks/{shop_task}", headers=scoped), 404, "task_not_found")
    assert api.get(f"/v1/tasks/{own_task}", headers=scoped).status_code == 200
    # the admin key sees both; the shop task was never touched by the scoped calls
    assert api.get(f"/v1/tasks/{shop_task}", headers={"X-API-Key": ADMIN}).json()["state"] != (
        "cancelled"
    )


def test_production_refuses_to_start_without_credentials(database_url: str) -> None:
    settings = msgspec.structs.replace(
        _settings(database_url, auth=ApiAuthSettings(enabled=True)), env="production"
    )
    with (
        tasker.Client(url=database_url) as client,
        pytest.raises(tasker.ConfigurationError, match=r"api\.auth"),
    ):
        create_app(settings, client=client)


def test_the_audit_records_the_caller(
    secured: tuple[TestClient[Any], str], database_url: str
) -> None:
    api, task = secured
    response = api.delete(f"/v1/tasks/{task}", headers={"X-API-Key": ADMIN})
    assert response.status_code == 200, response.text
    by = scalar(
        database_url,
        "SELECT metadata->>'by' FROM tasker.task_transitions WHERE task_uuid = %s "
        "AND to_state = 'cancelled'",
        (task,),
    )
    assert by == f"name-{ADMIN}"

"""The HTTP API against its own OpenAPI document, with schemathesis (property-based requests).

For every operation schemathesis sends requests generated from the document, valid ones and
invalid ones, with the admin key, and checks each
answer: no 500, a status the document lists, a body matching its schema and content type,
invalid data refused with a 4xx, and (``ignored_auth``) that leaving the key out gets 401.
Slow: it makes a few thousand requests against real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from litestar import Litestar
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

import tasker
from tasker.api.app import OPENAPI_PATH, create_app, openapi_document
from tasker.settings import ApiAuthSettings, ApiKey, ApiSettings, DatabaseSettings, Settings

KEY = "schema-test-admin-key-0001"

pytestmark = pytest.mark.slow


def _flow() -> tasker.Workflow:
    flow = tasker.Workflow("shop", "order", version="1.0.0", register=False)

    @flow.step()
    def validate(ctx: tasker.StepContext) -> None:
        return None

    return flow


@pytest.fixture
def api_app(database_url: str) -> Iterator[Litestar]:
    client = tasker.Client(url=database_url)
    client.register(_flow())
    client.submit("shop", "order", {"n": 1})
    auth = ApiAuthSettings(
        enabled=True, api_keys=[ApiKey(name="admin", key=KEY, permissions=["*:*"])]
    )
    settings = Settings(
        env="test",
        database=DatabaseSettings(url=database_url),
        # no backpressure: the generated tasks pile up in queues nothing consumes
        api=ApiSettings(auth=auth, max_body_bytes=64 * 1024, max_queue_depth=0),
    )
    try:
        yield create_app(settings, client=client)
    finally:
        client.close()


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Each operation with valid data, and with invalid data where there can be any (a body or
    a parameter that is not free text)."""
    found = []
    for path, item in openapi_document()["paths"].items():
        if path == "/metrics":  # Prometheus text, not a documented schema
            continue
        for method, operation in item.items():
            found.append((method.upper(), path, GenerationMode.POSITIVE))
            if "requestBody" in operation or any(
                _constrained(p["schema"]) for p in operation.get("parameters", [])
            ):
                found.append((method.upper(), path, GenerationMode.NEGATIVE))
    return found


def _constrained(schema: dict[str, Any]) -> bool:
    free = [{"type": "string"}, {"type": "null"}]
    return schema.get("oneOf") != free and schema != {"type": "string"}


#: Not checked: that every schema-valid request is accepted. Text PostgreSQL cannot store (NUL,
#: lone surrogates: 400 naming the field) and a body's unknown fields (refused, while Litestar's
#: schemas do not say `additionalProperties: false`) are valid by the document's schemas.
EXCLUDED = [positive_data_acceptance]


@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_the_api_answers_as_its_openapi_document_says(
    api_app: Litestar, method: str, path: str, mode: GenerationMode
) -> None:
    """(schemathesis's pytest plugin, `from_fixture`, does not run on pytest 9: the operations
    are parametrized here and each runs its own hypothesis test.)"""
    operation = schemathesis.openapi.from_asgi(OPENAPI_PATH, api_app)[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=EXCLUDED)

    run()

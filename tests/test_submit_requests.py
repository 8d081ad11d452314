"""Bad submit requests and task ids get a clear TaskerError before anything is written."""

from __future__ import annotations

from typing import Any

import pytest

import tasker
from tests.support import InProcessFlows, scalar

BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "priority_text": ({"priority": "high"}, "priority must be a whole number"),
    "priority_float": ({"priority": 1.5}, "priority must be a whole number"),
    "priority_bool": ({"priority": True}, "priority must be a whole number"),
    "priority_range": ({"priority": 500}, "from -100 to 100"),
    "key_int": ({"idempotency_key": 555}, "idempotency_key must be a string"),
    "key_empty": ({"idempotency_key": ""}, "1 to 255 characters"),
    "key_long": ({"idempotency_key": "k" * 256}, "1 to 255 characters"),
    "key_nul": ({"idempotency_key": "a\x00b"}, "NUL"),
    "key_surrogate": ({"idempotency_key": "\ud800"}, "lone surrogate"),
    "correlation_id": ({"correlation_id": "not-a-uuid"}, "correlation_id must be a UUID"),
    "initiator": ({"initiator": 7}, "initiator must be a string"),
    "tags": ({"tags": ["a"]}, "tags must be a JSON object"),
    "tags_value": ({"tags": {"a": {1, 2}}}, "set is not JSON"),
}


@pytest.fixture
def registered(flows: InProcessFlows) -> InProcessFlows:
    flow = tasker.Workflow("requests", "only", version="1.0.0", register=False)
    flow.step("only")(lambda ctx: None)
    flows.register(flow)
    return flows


@pytest.mark.parametrize("fields,message", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_are_refused_before_anything_is_written(
    registered: InProcessFlows, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(tasker.PayloadError, match=message):
        registered.client.submit("requests", "only", {}, **fields)
    assert scalar(registered.url, "SELECT count(*) FROM tasker.tasks") == 0


@pytest.mark.parametrize("context", [None, [], "text", 3], ids=repr)
def test_a_context_must_be_a_dict(registered: InProcessFlows, context: Any) -> None:
    if context is None:  # None means "no context": an empty one
        assert registered.client.submit("requests", "only", context).created
        return
    with pytest.raises(tasker.PayloadError, match="must be a JSON object"):
        registered.client.submit("requests", "only", context)


@pytest.mark.parametrize("task_id", ["not-a-uuid", "", "1234", None], ids=repr)
def test_a_task_id_that_is_not_a_uuid_is_not_found(
    registered: InProcessFlows, task_id: Any
) -> None:
    with pytest.raises(tasker.TaskNotFoundError, match="task ids are UUIDs"):
        registered.client.status(task_id)


def test_an_unknown_task_id_is_not_found(registered: InProcessFlows) -> None:
    with pytest.raises(tasker.TaskNotFoundError, match="No task"):
        registered.client.status("00000000-0000-0000-0000-000000000000")


def test_a_wrong_database_name_says_so(server_url: str) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(server_url)
    params["dbname"] = "no_such_database_here"
    client = tasker.Client(url=make_conninfo(**params), timeout_s=1)
    try:
        with pytest.raises(tasker.DatabaseUnavailableError, match="does not exist"):
            client.status("00000000-0000-0000-0000-000000000000")
    finally:
        client.close()

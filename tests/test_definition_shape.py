"""definition_shape: what may not change without a version bump, and what may."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tasker
from tasker.workflow.shape import definition_shape

TEMPLATES = Path(__file__).parent / "templates"

BASE: dict[str, Any] = {
    "name": "order",
    "namespace_name": "shop",
    "version": "1.0.0",
    "description": "Take an order",
    "steps": [
        {"name": "validate", "handler": {"callable": "shop.steps:validate"}},
        {"name": "reserve", "handler": {"callable": "shop.steps:reserve"}},
        {
            "name": "charge",
            "description": "Charge the card",
            "handler": {"callable": "shop.steps:charge", "initialization": {"gateway": "live"}},
            "dependencies": ["validate", "reserve"],
            "retry": {"max_attempts": 2, "backoff_base_ms": 2000},
            "timeout_seconds": 90,
        },
    ],
}

Edit = Callable[[dict[str, Any]], None]


def shape_after(edit: Edit) -> dict[str, Any]:
    template = copy.deepcopy(BASE)
    edit(template)
    return definition_shape(template, environment="development")


def step(template: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in template["steps"] if s["name"] == name)
    return found


def set_in(name: str, *keys: str, value: Any) -> Edit:
    def edit(template: dict[str, Any]) -> None:
        target = step(template, name)
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value

    return edit


def rename_validate(template: dict[str, Any]) -> None:
    step(template, "validate")["name"] = "check"
    step(template, "charge")["dependencies"] = ["check", "reserve"]


SAME: dict[str, Edit] = {
    "description": lambda t: t.update(description="Something else"),
    "step description": set_in("charge", "description", value="Bill the card"),
    "metadata": lambda t: t.update(metadata={"author": "someone"}),
    "handler path": set_in("charge", "handler", "callable", value="billing.v2:charge"),
    "step order": lambda t: t["steps"].reverse(),
    "dependency order": set_in("charge", "dependencies", value=["reserve", "validate"]),
    "defaults written out": set_in(
        "validate", "retry", value={"retryable": True, "max_attempts": 3, "backoff": "exponential"}
    ),
    "workflow backoff written out": lambda t: t.update(
        backoff={
            "backoff_base_ms": 1000,
            "backoff_multiplier": 2.0,
            "max_backoff_ms": 300000,
            "jitter": 0.1,
        }
    ),
    "the same step backoff written out": set_in(
        "validate", "retry", value={"backoff_base_ms": 1000, "max_backoff_ms": 300000}
    ),
    "float for int": set_in("charge", "timeout_seconds", value=90.0),
    "handler method call": set_in("charge", "handler", "method", value="call"),
    "standard type": set_in("charge", "type", value="standard"),
    "version": lambda t: t.update(version="1.0.1"),
}

DIFFERENT: dict[str, Edit] = {
    "a step added": lambda t: t["steps"].append(
        {"name": "ship", "handler": {"callable": "s:ship"}, "dependencies": ["charge"]}
    ),
    "a step renamed": rename_validate,
    "an edge removed": set_in("charge", "dependencies", value=["validate"]),
    "an edge added": set_in("reserve", "dependencies", value=["validate"]),
    "retryable": set_in("charge", "retry", "retryable", value=False),
    "max_attempts": set_in("charge", "retry", "max_attempts", value=3),
    "timeout": set_in("charge", "timeout_seconds", value=91),
    "timeout added": set_in("validate", "timeout_seconds", value=5),
    "inputs": set_in("charge", "handler", "initialization", value={"gateway": "sandbox"}),
    "inputs added": set_in("validate", "handler", "initialization", value={"strict": True}),
    "breaker added": set_in("charge", "breaker", value="payments"),
    "step backoff base": set_in("charge", "retry", "backoff_base_ms", value=2500),
    "step backoff multiplier": set_in("charge", "retry", "backoff_multiplier", value=3),
    "step backoff cap": set_in("charge", "retry", "max_backoff_ms", value=1000),
    "step jitter": set_in("charge", "retry", "jitter", value=0.5),
    "workflow backoff": lambda t: t.update(backoff={"backoff_base_ms": 10}),
    "identity_strategy": lambda t: t.update(identity_strategy="strict"),
    "input_schema added": lambda t: t.update(input_schema={"type": "object"}),
}


@pytest.mark.parametrize("edit", SAME.values(), ids=SAME.keys())
def test_what_may_change_within_a_version(edit: Edit) -> None:
    assert shape_after(edit) == shape_after(lambda t: None)


@pytest.mark.parametrize("edit", DIFFERENT.values(), ids=DIFFERENT.keys())
def test_what_needs_a_new_version(edit: Edit) -> None:
    assert shape_after(edit) != shape_after(lambda t: None)


def test_input_schema_changes_count() -> None:
    def schema(minimum: int) -> Edit:
        return lambda t: t.update(input_schema={"properties": {"qty": {"minimum": minimum}}})

    assert shape_after(schema(1)) == shape_after(schema(1))
    assert shape_after(schema(1)) != shape_after(schema(0))


def test_the_stored_template_has_the_shape_of_its_source() -> None:
    raw = tasker.workflow.templates.read_template_file(TEMPLATES / "order_fulfillment.yaml")
    flow = tasker.Workflow.from_template(
        raw, resolve_handlers=False, register=False, environment="test"
    )
    stored = json.loads(json.dumps(flow.to_template()))  # as jsonb gives it back
    assert definition_shape(stored) == definition_shape(raw, environment="test")
    assert definition_shape(stored) != definition_shape(raw, environment="production")


def test_the_shape_reads_as_documented() -> None:
    shape = definition_shape(BASE)
    assert set(shape) == {"steps", "backoff", "identity_strategy", "input_schema"}
    assert shape["steps"]["charge"] == {
        "dependencies": ["reserve", "validate"],
        "retryable": True,
        "max_attempts": 2,
        "timeout_seconds": 90,
        "inputs": {"gateway": "live"},
        "breaker": None,
        "backoff": {"base_seconds": 2.0, "multiplier": 2.0, "max_seconds": 300.0, "jitter": 0.1},
    }
    assert shape["input_schema"] is None
    json.dumps(shape)  # plain JSON: the engine may store or log it

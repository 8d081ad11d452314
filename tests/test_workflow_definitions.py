"""The pure workflow domain: definitions, templates, state machines, retry policy."""

from __future__ import annotations

import enum
import math
import random
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.runtime.workflows import bind_workflow, install
from tasker.workflow.backoff import (
    MAX_BACKOFF_S,
    BackoffPolicy,
    decide_retry,
    final_failure_reason,
)
from tasker.workflow.states import check_step_path, check_task_path

TEMPLATES = Path(__file__).parent / "templates"


@pytest.fixture(autouse=True)
def _forget_registered_workflows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workflows these tests register (some on purpose without steps) stay out of the
    process-wide registry that later tests' workers register at boot."""
    from tasker.workflow import definition

    monkeypatch.setattr(definition, "_WORKFLOWS", dict(definition._WORKFLOWS))


def test_dependencies_must_be_declared_first() -> None:
    flow = tasker.Workflow("ns", "wf", register=False)
    with pytest.raises(tasker.WorkflowDefinitionError, match="declare dependencies"):
        flow.step("b", depends_on=["a"])(lambda ctx: None)


def test_cycles_in_templates_are_rejected_with_the_steps_named() -> None:
    template = {
        "name": "wf",
        "namespace_name": "ns",
        "version": "1.0.0",
        "steps": [
            {"name": "a", "handler": {"callable": "m:a"}, "dependencies": ["c"]},
            {"name": "b", "handler": {"callable": "m:b"}, "dependencies": ["a"]},
            {"name": "c", "handler": {"callable": "m:c"}, "dependencies": ["b"]},
        ],
    }
    with pytest.raises(tasker.WorkflowDefinitionError, match=r"cycle.*\['a', 'b', 'c'\]"):
        tasker.Workflow.from_template(template, resolve_handlers=False, register=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": "Bad-NS"}, "Namespace"),
        ({"name": ""}, "Workflow name"),
        ({"version": "x" * 20}, "version"),
        ({"identity_strategy": "sometimes"}, "identity_strategy"),
    ],
)
def test_bad_definitions_name_the_fix(kwargs: dict[str, Any], message: str) -> None:
    args = {"namespace": "ns", "name": "wf", **kwargs}
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        tasker.Workflow(args.pop("namespace"), args.pop("name"), register=False, **args)


@pytest.mark.parametrize(
    ("lifecycle", "message"),
    [
        ({"max_duration": 5}, "lifecycle.max_duration is not a known field; did you mean"),
        ({"max_steps_in_process_minutes": 0}, "must be an integer from 1 to"),
        ({"max_duration_minutes": -5}, "must be an integer from 1 to"),
        ({"max_duration_minutes": True}, "max_duration_minutes must be an integer"),
        ({"max_waiting_for_retry_minutes": 2.5}, "max_waiting_for_retry_minutes must be an"),
        ({"staleness_action": "explode"}, "staleness_action must be one of"),
        ([{"max_duration_minutes": 5}], "lifecycle must be a mapping"),
        ("max_duration_minutes=5", "lifecycle must be a mapping"),
    ],
)
def test_lifecycle_in_python_follows_the_template_rule(lifecycle: Any, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        tasker.Workflow("ns", "wf", lifecycle=lifecycle, register=False)


def test_lifecycle_fields_without_effect_warn_in_python_too() -> None:
    with pytest.warns(tasker.TemplateWarning, match="staleness_action is not applied") as caught:
        flow = tasker.Workflow(
            "ns",
            "wf",
            lifecycle={"max_duration_minutes": 90, "staleness_action": "dlq"},
            register=False,
        )
    assert caught[0].filename == __file__  # points at the caller
    assert flow.lifecycle == {"max_duration_minutes": 90}


def test_names_and_versions_given_as_str_enums_are_kept_as_their_text() -> None:
    class Version(str, enum.Enum):  # noqa: UP042 (the case: str() is "Version.ONE")
        ONE = "1.0.0"

    class Name(str, enum.Enum):  # noqa: UP042
        NAMESPACE = "shop"
        FIRST = "first"
        SECOND = "second"

    flow = tasker.Workflow(Name.NAMESPACE, "orders", Version.ONE, register=False)
    flow.step(Name.FIRST)(lambda ctx: None)
    flow.step(Name.SECOND, depends_on=[Name.FIRST])(lambda ctx: None)
    assert flow.key == ("shop", "orders", "1.0.0")
    assert all(type(part) is str for part in flow.key)
    assert flow.actor_name("first") == "tasker.shop.orders@1.0.0.first"
    assert [type(name) for name in flow.steps] == [str, str]
    assert flow.steps["second"].depends_on == ("first",)
    assert type(flow.steps["second"].depends_on[0]) is str
    assert flow.to_template()["version"] == "1.0.0"


def test_unknown_handler_in_a_template_is_a_clear_error() -> None:
    template = {
        "name": "wf",
        "namespace_name": "ns",
        "version": "1.0.0",
        "steps": [{"name": "a", "handler": {"callable": "tests.nowhere:fn"}}],
    }
    with pytest.raises(tasker.WorkflowDefinitionError, match="Cannot import handler"):
        tasker.Workflow.from_template(template, register=False)


def test_template_round_trip_keeps_the_definition() -> None:
    flow = tasker.Workflow.from_yaml(TEMPLATES / "diamond.yaml")
    again = tasker.Workflow.from_template(
        flow.to_template(), resolve_handlers=False, register=False
    )
    assert again.to_template() == flow.to_template()
    assert flow.steps["diamond_branch_b"].max_attempts == 2
    assert flow.step_policy("diamond_branch_b").base_seconds == 0.1
    assert flow.steps["diamond_end"].timeout == 30


def test_yaml_template_with_async_handler_runs_end_to_end(broker: PGMQBroker) -> None:
    flow = tasker.Workflow.from_yaml(TEMPLATES / "diamond.yaml")
    install(broker, bind_workflows=False)
    bind_workflow(broker, flow)
    client = tasker.Client(broker=broker)
    client.register(flow)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        handle = client.submit("yaml_ns", "diamond_yaml", {"even_number": 4})
        status = client.wait(handle.task_uuid, timeout=20)
    finally:
        worker.stop()
    assert status.state == "complete"
    assert status.version == "1.2.0"
    end = status.step("diamond_end").result
    assert end == {
        "value": 12 + 1 + 12 + 2,
        "saw": ["diamond_branch_b", "diamond_branch_c", "diamond_start"],
    }


def test_state_machines_refuse_invalid_transitions() -> None:
    assert check_task_path("pending", "initializing", "enqueuing_steps", "steps_in_process")
    with pytest.raises(tasker.InvalidTransitionError):
        check_task_path("complete", "pending")
    with pytest.raises(tasker.InvalidTransitionError):
        check_task_path("pending", "complete")
    assert check_step_path("enqueued", "in_progress", "enqueued_for_orchestration", "complete")
    with pytest.raises(tasker.InvalidTransitionError):
        check_step_path("pending", "complete")
    with pytest.raises(tasker.InvalidTransitionError):
        check_step_path("complete", "cancelled")
    assert check_step_path("error", "resolved_manually") is tasker.StepState.RESOLVED_MANUALLY
    assert len(tasker.TaskState) == 12 and len(tasker.StepState) == 10


@given(
    attempts=st.integers(0, 1000),
    policy=st.builds(
        BackoffPolicy,
        base_seconds=st.floats(0, 10) | st.floats(0, MAX_BACKOFF_S),
        multiplier=st.floats(1, 4) | st.floats(1, 1e300),
        max_seconds=st.floats(0, 600) | st.floats(0, MAX_BACKOFF_S),
        jitter=st.floats(0, 0.9),
    ),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_capped_and_within_jitter(
    attempts: int, policy: BackoffPolicy, seed: int
) -> None:
    base, multiplier, cap, jitter = (
        policy.base_seconds,
        policy.multiplier,
        policy.max_seconds,
        policy.jitter,
    )
    delay = policy.delay(attempts, random.Random(seed))
    try:
        growth = multiplier**attempts
    except OverflowError:
        growth = math.inf
    raw = min(base * growth, cap) if base else 0.0
    assert 0 <= delay <= cap
    assert raw * (1 - jitter) - 1e-9 <= delay <= raw * (1 + jitter) + 1e-9


@pytest.mark.parametrize(
    "fields",
    [{"base_seconds": MAX_BACKOFF_S + 1}, {"max_seconds": 1e12}, {"base_seconds": 1e300}],
)
def test_backoff_delays_are_at_most_30_days(fields: dict[str, float]) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=r"at most 2592000 \(30 days\)"):
        BackoffPolicy(**fields)


@given(
    template=st.booleans(),
    error=st.booleans(),
    attempts=st.integers(0, 5),
    max_attempts=st.integers(1, 5),
    retry_after=st.none() | st.floats(0, 100),
)
def test_retry_needs_template_error_and_attempts(
    template: bool, error: bool, attempts: int, max_attempts: int, retry_after: float | None
) -> None:
    policy = BackoffPolicy(max_seconds=50, jitter=0)
    decision = decide_retry(
        template_retryable=template,
        error_retryable=error,
        attempts=attempts,
        max_attempts=max_attempts,
        policy=policy,
        retry_after=retry_after,
    )
    assert decision.retry == (template and error and attempts < max_attempts)
    if decision.retry and retry_after is not None:
        assert decision.delay_seconds == min(retry_after, 50)
    final = final_failure_reason(
        template_retryable=template,
        error_retryable=error,
        attempts=attempts,
        max_attempts=max_attempts,
    )
    assert (final is None) == decision.retry  # what a worker reports as final is what is final
    assert final is None or final == decision.reason


def _unique_name() -> str:
    return "dup_" + uuid.uuid4().hex[:12]


def test_a_version_defined_twice_in_one_process_is_refused() -> None:
    name = _unique_name()
    first = tasker.Workflow("dups", name, version="1.0.0")
    first.step("a")(lambda ctx: 1)
    with pytest.raises(tasker.WorkflowDefinitionError) as caught:
        tasker.Workflow("dups", name, version="1.0.0")
    message = str(caught.value)
    assert "already defined in this process (at " in message and __file__ in message
    assert "give this one another version" in message
    tasker.Workflow("dups", name, version="1.1.0")  # another version is another definition
    tasker.Workflow("dups", name, version="1.0.0", register=False)  # not for the workers


def test_the_same_code_defining_a_workflow_again_replaces_it() -> None:
    """A module reloaded or a notebook cell run twice: the same line runs again."""
    name = _unique_name()
    flows = []
    for attempts in (1, 2):
        flow = tasker.Workflow("dups", name, version="1.0.0")
        flow.step("a", max_attempts=attempts)(lambda ctx: 1)
        flows.append(flow)
    from tasker.workflow.definition import registered_workflows

    mine = [f for f in registered_workflows() if f.name == name]
    assert mine == [flows[1]]


def test_one_template_loaded_in_two_places_is_one_definition() -> None:
    name = _unique_name()
    template = {
        "name": name,
        "namespace_name": "dups",
        "version": "1.0.0",
        "steps": [{"name": "a", "handler": {"callable": "m:f"}}],
    }
    tasker.Workflow.from_template(template, resolve_handlers=False)
    tasker.Workflow.from_template(template, resolve_handlers=False)  # identical: fine
    changed = {**template, "steps": [{"name": "b", "handler": {"callable": "m:f"}}]}
    with pytest.raises(tasker.WorkflowDefinitionError, match="already defined in this process"):
        tasker.Workflow.from_template(changed, resolve_handlers=False)


def test_an_empty_step_name_is_refused_not_replaced_by_the_function_name() -> None:
    flow = tasker.Workflow("ns", "wf", register=False)
    with pytest.raises(tasker.WorkflowDefinitionError, match="Step name '' is invalid"):
        flow.step("")(lambda ctx: None)
    flow.step()(len)  # no name: the function's
    assert list(flow.steps) == ["len"]

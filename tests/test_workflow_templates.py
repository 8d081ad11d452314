"""Task templates are validated, not coerced: types, unknown fields, refused and warned features,
environments, and the same strictness for definitions written in Python."""

from __future__ import annotations

import copy
import datetime
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tasker
from tasker.exceptions import TemplateWarning
from tasker.workflow.definition import StepDefinition
from tasker.workflow.templates import check_template

TEMPLATES = Path(__file__).parent / "templates"
INVALID = sorted((TEMPLATES / "invalid").glob("*.yaml"))

BASE: dict[str, Any] = {
    "name": "order",
    "namespace_name": "shop",
    "version": "1.0.0",
    "steps": [
        {"name": "validate", "handler": {"callable": "shop.steps:validate"}},
        {
            "name": "charge",
            "handler": {"callable": "shop.steps:charge"},
            "dependencies": ["validate"],
        },
    ],
}

Edit = Callable[[dict[str, Any]], None]


def load(template: Any, **kwargs: Any) -> tasker.Workflow:
    return tasker.Workflow.from_template(template, resolve_handlers=False, register=False, **kwargs)


def edited(edit: Edit) -> dict[str, Any]:
    template = copy.deepcopy(BASE)
    edit(template)
    return template


def charge(template: dict[str, Any]) -> dict[str, Any]:
    step: dict[str, Any] = template["steps"][1]
    return step


def on_charge(**fields: Any) -> Edit:
    return lambda t: charge(t).update(fields)


def on_retry(**fields: Any) -> Edit:
    return lambda t: charge(t).setdefault("retry", {}).update(fields)


def on_handler(**fields: Any) -> Edit:
    return lambda t: charge(t)["handler"].update(fields)


def on_top(**fields: Any) -> Edit:
    return lambda t: t.update(fields)


def without(*keys: str, step: bool = False) -> Edit:
    def edit(template: dict[str, Any]) -> None:
        target = charge(template) if step else template
        for key in keys:
            del target[key]

    return edit


def on_environment(*overrides: dict[str, Any], name: str = "test") -> Edit:
    return lambda t: t.update(environments={name: {"steps": list(overrides)}})


# -- the seed-format templates load ----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_valid_template_file_loads_and_round_trips(path: Path) -> None:
    flow = tasker.Workflow.from_yaml(path, register=False, environment="development")
    again = load(flow.to_template())
    assert again.to_template() == flow.to_template()


def test_the_order_fulfillment_template_keeps_what_it_declares() -> None:
    flow = tasker.Workflow.from_yaml(
        TEMPLATES / "order_fulfillment.yaml", register=False, environment="development"
    )
    payment = flow.steps["process_payment"]
    assert (payment.max_attempts, payment.timeout) == (2, 90)
    assert flow.step_policy("process_payment").base_seconds == 2.0  # merged over the anchor
    assert flow.step_policy("process_payment").max_seconds == 30.0
    assert payment.inputs == {"gateway": "live", "currency": "EUR"}
    assert flow.steps["reserve_inventory"].max_attempts == 3  # the anchor itself
    assert flow.input_schema is not None and flow.input_schema["required"][0] == "customer"
    assert flow.metadata["tags"] == ["orders", "e2e"]
    template = flow.to_template()
    assert template["input_schema"] == flow.input_schema
    assert template["metadata"]["author"] == "tasker tests"
    assert "environments" not in template


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_template_files_are_refused_naming_the_file(path: Path) -> None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# error: "), "each invalid template says what it must raise"
    expected = first_line.removeprefix("# error: ")
    with pytest.raises(tasker.WorkflowDefinitionError) as caught:
        tasker.Workflow.from_yaml(path, resolve_handlers=False, register=False)
    assert str(path) in str(caught.value)
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_the_seed_messages_read_as_documented() -> None:
    with pytest.raises(tasker.WorkflowDefinitionError) as caught:
        tasker.Workflow.from_yaml(
            TEMPLATES / "invalid" / "max_attempts_float.yaml", resolve_handlers=False
        )
    assert str(caught.value) == (
        f"{TEMPLATES / 'invalid' / 'max_attempts_float.yaml'}: step 'charge': "
        "retry.max_attempts must be an integer, got 2.9."
    )


# -- wrong types, field by field -------------------------------------------------------------------

WRONG_TYPES: list[tuple[Edit, str]] = [
    # the template
    (on_top(name=5), "name must be a string, got 5"),
    (on_top(name=None), r"name must be a string, got null"),
    (on_top(namespace_name=["shop"]), "namespace_name must be a string, got the list"),
    (on_top(version=1.1), "quote the version"),
    (on_top(version=2), "quote the version"),
    (on_top(version="1.0"), r"e\.g\. '1\.0\.0'"),
    (on_top(description=3), "description must be a string"),
    (on_top(metadata=["a"]), "metadata must be a mapping, got the list"),
    (on_top(metadata={"at": datetime.date(2024, 1, 1)}), r'metadata\["at"\] must be JSON.*quote'),
    (
        on_top(metadata={1: "a"}),
        r"metadata\[\{1\}\] must be JSON: key 1 is an int; JSON keys are strings",
    ),
    (on_top(identity_strategy="strickt"), "did you mean 'strict'"),
    (on_top(identity_strategy=1), "identity_strategy must be a string"),
    (on_top(backoff="fast"), "backoff must be a mapping, got 'fast'"),
    (on_top(backoff={"backoff_base_ms": "100"}), "backoff.backoff_base_ms must be a number"),
    (on_top(backoff={"jitter": 1.5}), "backoff.jitter must be a number at least 0 and below 1"),
    (on_top(backoff={"backoff_multiplier": 0.5}), "backoff_multiplier must be a number at least 1"),
    (on_top(backoff={"max_backoff_ms": math.inf}), "max_backoff_ms must be a number at least 0"),
    (on_top(input_schema=[]), "input_schema must be a mapping"),
    (on_top(steps="validate"), "steps must be a list, got 'validate'"),
    (on_top(steps=[]), "steps must list at least one step"),
    (lambda t: t["steps"].append("x"), "step #3 must be a mapping with a name, got 'x'"),
    (on_top(environments=["test"]), "environments must be a mapping of environment names"),
    (on_top(environments={"test": []}), "environments.test must be a mapping"),
    (on_top(environments={"test": {"steps": {}}}), "environments.test.steps must be a list"),
    (on_top(environments={5: {"steps": []}}), "environments has the key 5"),
    # a step
    (on_charge(name=7), "step #2: name must be a string, got 7"),
    (on_charge(description=["x"]), "step 'charge': description must be a string"),
    (on_charge(handler="shop.steps:charge"), "step 'charge': handler must be a mapping"),
    (on_charge(handler={}), "step 'charge': handler.callable is required"),
    (on_handler(callable=5), "handler.callable must be a string, got 5"),
    (on_handler(callable=""), "handler.callable must not be empty"),
    (on_handler(initialization=[1]), "handler.initialization must be a mapping"),
    (
        on_handler(initialization={"x": math.nan}),
        r'initialization\["x"\] must be JSON: nan is not JSON',
    ),
    (
        on_handler(initialization={"x": {2: 1}}),
        r'initialization\["x"\]\[\{2\}\] must be JSON: key 2',
    ),
    (
        on_handler(initialization={"x": [b"1"]}),
        r'initialization\["x"\]\[0\] must be JSON: bytes is not JSON',
    ),
    (on_handler(method=1), "handler.method must be a string"),
    (on_charge(type=1), "step 'charge': type must be a string"),
    (
        on_charge(type="standrd"),
        "type must be one of 'standard', got 'standrd'; did you mean 'standard'",
    ),
    (on_charge(step_type="decisoin"), "did you mean 'decision'"),
    (on_charge(type="standard", step_type="standard"), "step_type repeats type"),
    (on_charge(dependencies="ab"), r"write \['ab'\] for one"),
    (on_charge(dependencies=None), "dependencies must be a list of step names, got null"),
    (on_charge(dependencies=[1]), r"dependencies\[0\] must list step names, got 1"),
    (on_charge(dependencies=["validate", "validate"]), "lists 'validate' more than once"),
    (on_charge(dependencies=["validat"]), "names 'validat'.*did you mean 'validate'"),
    (on_charge(retry=3), "retry must be a mapping, got 3"),
    (on_retry(retryable="no"), "retry.retryable must be true or false"),
    (on_retry(retryable=1), "retry.retryable must be true or false .*got 1"),
    (on_retry(retryable=None), "retry.retryable must be true or false"),
    (on_retry(max_attempts=2.9), "retry.max_attempts must be an integer, got 2.9"),
    (on_retry(max_attempts=2.0), "retry.max_attempts must be an integer, got 2.0"),
    (on_retry(max_attempts="three"), "retry.max_attempts must be an integer, got 'three'"),
    (on_retry(max_attempts=True), "retry.max_attempts must be an integer, got True"),
    (on_retry(max_attempts=0), "max_attempts must be an integer from 1 to 1000, got 0"),
    (on_retry(max_attempts=1001), "from 1 to 1000, got 1001"),
    (on_retry(backoff="exp"), "retry.backoff must be one of 'exponential'"),
    (on_retry(backoff=2), "retry.backoff must be a string"),
    (on_retry(backoff_base_ms="1000"), "retry.backoff_base_ms must be a number, got '1000'"),
    (on_retry(backoff_base_ms=-1), "backoff_base_ms must be a number at least 0 and at most"),
    (on_retry(backoff_base_ms=1e300), "backoff_base_ms must be .* at most 2592000000, got 1e"),
    (on_retry(max_backoff_ms=1e14), "max_backoff_ms must be .* at most 2592000000, got 1"),
    (on_top(backoff={"backoff_base_ms": 3e9}), "backoff.backoff_base_ms must be .* at most"),
    (on_retry(max_backoff_ms=True), "max_backoff_ms must be a number, got True"),
    (on_retry(jitter=1), "jitter must be a number at least 0 and below 1, got 1"),
    (on_charge(timeout_seconds="30"), "timeout_seconds must be a number, got '30'"),
    (on_charge(timeout_seconds=0), "timeout_seconds must be a number above 0"),
    (on_charge(timeout_seconds=3e6), "at most 2592000, got 3000000.0"),
    (on_charge(timeout_seconds=math.inf), "timeout_seconds must be a number above 0"),
    (on_charge(timeout_seconds=None), "timeout_seconds must be a number, got null"),
    (on_charge(system_dependency=3), "system_dependency must be a string"),
    (on_charge(publishes_events="x"), "publishes_events is not supported"),
    # names, duplicates, cycles, handlers (checked when the workflow is built)
    (on_charge(name="validate"), "step 'validate' is declared twice"),
    (on_charge(name="Charge"), "Step name 'Charge' is invalid"),
    (on_top(namespace_name="Bad-NS"), "Namespace 'Bad-NS' is invalid"),
    (lambda t: t["steps"][0].update(dependencies=["charge"]), "dependency cycle"),
    # every string and value is stored as given, or refused here rather than by PostgreSQL
    (on_top(description="a\x00b"), "description cannot be stored: the text contains a NUL"),
    (on_charge(description="\ud800"), "step 'charge': description cannot be stored: .*surrogate"),
    (on_handler(callable="shop:charge\x00"), r"step 'charge': handler\.callable cannot be stored"),
    (on_charge(system_dependency="db\x00"), "step 'charge': system_dependency cannot be stored"),
    (
        on_top(metadata={"note": "\x00"}),
        r'metadata\["note"\] must be JSON: the text contains a NUL',
    ),
    (on_top(metadata={"k\udfff": 1}), r"metadata\[.*\] must be JSON: the key contains a lone"),
    (on_handler(initialization={"n": 2**64}), r'initialization\["n"\] must be JSON: int beyond'),
    (on_handler(initialization={"n": 2.0**60}), r'initialization\["n"\] must be JSON: the float'),
    (on_top(input_schema={"description": "\x00"}), r"input_schema.* the text contains a NUL"),
    (
        on_top(
            environments={
                "prod": {"steps": [{"name": "ALL", "handler": {"initialization": {"n": -(2**70)}}}]}
            }
        ),
        r"environments\.prod: step 'ALL': handler\.initialization\[\"n\"\] must be JSON",
    ),
]


@pytest.mark.parametrize(("edit", "message"), WRONG_TYPES)
def test_wrong_types_are_refused_naming_the_step_and_field(edit: Edit, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=message) as caught:
        load(edited(edit))
    assert str(caught.value).startswith("task template: ")


def test_a_template_must_be_a_mapping() -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match="task template must be a mapping"):
        load(["name", "steps"])


def test_a_missing_required_field_is_named() -> None:
    for key in ("name", "namespace_name", "version", "steps"):
        with pytest.raises(
            tasker.WorkflowDefinitionError, match=f"^task template: {key} is required"
        ):
            load(edited(without(key)))
    with pytest.raises(tasker.WorkflowDefinitionError, match="step 'charge': handler is required"):
        load(edited(without("handler", step=True)))


# -- unknown fields, at every level ----------------------------------------------------------------

UNKNOWN_FIELDS: list[tuple[Edit, str]] = [
    (on_top(nmae="x"), "task template: nmae is not a known field; did you mean 'name'?"),
    (on_top(enviroments={}), "did you mean 'environments'"),
    (on_top(zzz=1), "zzz is not a known field; the fields here are name, namespace_name"),
    (
        on_charge(dependancies=[]),
        "step 'charge': dependancies is not a known field; did you mean 'dependencies'?",
    ),
    (
        on_charge(timeout=5),
        "step 'charge': timeout is not a known field; did you mean 'timeout_seconds'?",
    ),
    (on_handler(callabel="x"), "handler.callabel is not a known field; did you mean 'callable'?"),
    (
        on_retry(max_attempt=3),
        "retry.max_attempt is not a known field; did you mean 'max_attempts'?",
    ),
    (on_retry(limit=3), "retry.limit is not a known field; the fields here are retryable"),
    (on_top(backoff={"jiter": 0.1}), "backoff.jiter is not a known field; did you mean 'jitter'?"),
    (
        on_top(lifecycle={"max_duration": 5}),
        "lifecycle.max_duration is not a known field; did you mean 'max_duration_minutes'?",
    ),
    (
        on_top(system_dependencies={"primry": "x"}),
        "system_dependencies.primry is not a known field; did you mean 'primary'?",
    ),
    (
        on_top(environments={"test": {"stepz": []}}),
        "environments.test.stepz is not a known field; did you mean 'steps'?",
    ),
    (
        on_environment({"name": "charge", "timeout": 5}),
        "environments.test: step 'charge': timeout is not a known field; did you mean "
        "'timeout_seconds'?",
    ),
    (
        on_environment({"name": "charge", "handler": {"callable": "x"}}),
        "environments.test: step 'charge': handler.callable is not a known field; the fields "
        "here are initialization",
    ),
    (
        on_environment({"name": "charge", "retry": {"retries": 1}}),
        "retry.retries is not a known field",
    ),
]


@pytest.mark.parametrize(("edit", "message"), UNKNOWN_FIELDS)
def test_unknown_fields_are_refused_with_the_closest_name(edit: Edit, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=re.escape(message)):
        load(edited(edit))


# -- features Tasker does not implement ------------------------------------------------------------

REFUSED: list[tuple[Edit, str]] = [
    (on_charge(type="decision"), "type 'decision' is not supported: Tasker has no decision points"),
    (on_charge(type="deferred_convergence"), "type 'deferred_convergence' is not supported"),
    (
        on_charge(type="batchable"),
        "type 'batchable' is not supported: Tasker has no batch processing",
    ),
    (on_charge(step_type="batch_worker"), "step_type 'batch_worker' is not supported"),
    (on_charge(step_type="decision"), "step_type 'decision' is not supported"),
    (on_charge(batch_config={"worker_template": "w"}), "batch_config is not supported"),
    (
        on_charge(publishes_events=[{"name": "paid"}]),
        "publishes_events is not supported: Tasker publishes no domain events",
    ),
    (on_top(domain_events=[{"name": "paid"}]), "domain_events is not supported"),
    (
        on_top(task_handler={"callable": "x"}),
        "task_handler is not supported: Tasker has no task-level handler",
    ),
    (
        on_handler(method="validate"),
        "handler.method 'validate' is not supported: Tasker calls the function",
    ),
    (on_handler(resolver="explicit_mapping"), "handler.resolver is not supported"),
    (
        on_retry(backoff="linear"),
        "retry.backoff 'linear' is not supported: Tasker's backoff is exponential",
    ),
    (on_retry(backoff="fibonacci"), "retry.backoff 'fibonacci' is not supported"),
    (on_retry(backoff="none"), "write backoff_base_ms: 0"),
    (
        on_top(environments={"test": {"task_handler": {}, "steps": []}}),
        "environments.test.task_handler is not supported",
    ),
]


@pytest.mark.parametrize(("edit", "message"), REFUSED)
def test_unimplemented_features_are_refused(edit: Edit, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=re.escape(message)):
        load(edited(edit))


@pytest.mark.parametrize(
    "edit",
    [
        on_charge(type="standard"),
        on_charge(step_type="standard"),
        on_handler(method="call"),
        on_retry(backoff="exponential"),
        on_charge(publishes_events=[]),
        on_top(domain_events=[]),
        on_top(description="An order", metadata={"author": "me", "tags": ["a"]}),
        on_charge(description="Charge the card"),
        on_top(environments={}),
        on_top(environments={"test": {}}),
    ],
)
def test_values_that_ask_for_nothing_unsupported_load_silently(edit: Edit) -> None:
    load(edited(edit))  # filterwarnings = error: any warning would fail this test


# -- fields accepted with a warning ----------------------------------------------------------------

WARNED: list[tuple[Edit, str]] = [
    (
        on_top(lifecycle={"staleness_action": "dlq"}),
        "task template: lifecycle.staleness_action is not applied",
    ),
    (
        on_top(lifecycle={"auto_fail_on_timeout": True}),
        "task template: lifecycle.auto_fail_on_timeout is accepted but changes nothing",
    ),
    (
        on_top(system_dependencies={"primary": "default", "secondary": []}),
        "task template: system_dependencies is accepted but changes nothing",
    ),
    (
        on_charge(system_dependency="stripe"),
        "task template: step 'charge': system_dependency is accepted but changes nothing",
    ),
]


@pytest.mark.parametrize(("edit", "message"), WARNED)
def test_fields_without_effect_are_accepted_with_a_warning(edit: Edit, message: str) -> None:
    with pytest.warns(TemplateWarning, match=re.escape(message)):
        load(edited(edit))


def test_warnings_name_the_file_and_every_field() -> None:
    path = TEMPLATES / "warned" / "unused_fields.yaml"
    with pytest.warns(TemplateWarning) as caught:
        flow = tasker.Workflow.from_yaml(path, register=False)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        f"{path}: lifecycle.auto_fail_on_timeout is accepted but changes nothing in Tasker.",
        f"{path}: lifecycle.staleness_action is not applied: a stale task always goes to the "
        "task DLQ and to error.",
        f"{path}: step 'only': system_dependency is accepted but changes nothing in Tasker.",
        f"{path}: system_dependencies is accepted but changes nothing in Tasker.",
    ]
    assert all(w.category is TemplateWarning for w in caught)
    assert caught[0].filename == __file__  # attributed to the caller's line
    assert list(flow.steps) == ["only"]
    assert flow.lifecycle == {"max_duration_minutes": 60, "max_waiting_for_retry_minutes": 30}
    assert flow.to_template()["lifecycle"] == dict(flow.lifecycle)  # the coordinator reads it


def test_warned_fields_are_still_validated_and_a_refused_template_warns_nothing() -> None:
    with pytest.raises(
        tasker.WorkflowDefinitionError, match="max_duration_minutes must be an integer"
    ):
        load(edited(on_top(lifecycle={"max_duration_minutes": "1h"})))
    template = edited(on_top(lifecycle={"max_duration_minutes": 5}))
    charge(template)["retry"] = {"max_attempts": 0}
    with pytest.raises(tasker.WorkflowDefinitionError, match="max_attempts"):
        load(template)  # no TemplateWarning escapes (it would be an error here)


def test_template_warning_is_public_and_a_user_warning() -> None:
    assert tasker.TemplateWarning is TemplateWarning
    assert issubclass(TemplateWarning, UserWarning)


# -- environments ----------------------------------------------------------------------------------


def fulfillment(environment: str | None) -> tasker.Workflow:
    return tasker.Workflow.from_yaml(
        TEMPLATES / "order_fulfillment.yaml",
        resolve_handlers=False,
        register=False,
        environment=environment,
    )


def test_named_overrides_apply_on_top_of_all_whatever_their_order() -> None:
    flow = fulfillment("test")
    payment = flow.steps["process_payment"]
    assert payment.max_attempts == 5  # named (listed first) wins over ALL
    assert payment.timeout == 10  # from ALL
    assert payment.inputs == {"gateway": "sandbox", "currency": "EUR"}  # merged, override wins
    assert flow.step_policy("process_payment").base_seconds == 2.0  # other retry fields stay
    for name in ("validate_order", "reserve_inventory", "ship_order"):
        assert (flow.steps[name].max_attempts, flow.steps[name].timeout) == (1, 10)
    assert flow.steps["validate_order"].retryable is True


def test_other_environments_leave_the_rest_alone() -> None:
    production = fulfillment("production")
    assert {s.timeout for s in production.steps.values()} == {120}
    assert production.steps["process_payment"].max_attempts == 2
    development = fulfillment("development")
    assert development.steps["ship_order"].timeout is None
    assert development.steps["validate_order"].timeout == 30


def test_the_environment_defaults_to_tasker_env_then_development(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    assert fulfillment(None).steps["ship_order"].max_attempts == 1
    monkeypatch.setenv("TASKER_ENV", "production")
    assert fulfillment(None).steps["ship_order"].timeout == 120
    monkeypatch.delenv("TASKER_ENV")
    assert fulfillment(None).steps["ship_order"].timeout is None
    assert fulfillment("test").steps["ship_order"].max_attempts == 1  # explicit wins


def test_every_environment_is_checked_not_only_the_current_one() -> None:
    bad = edited(on_environment({"name": "charge", "retry": {"max_attempts": "2"}}, name="prod"))
    with pytest.raises(
        tasker.WorkflowDefinitionError,
        match=re.escape("environments.prod: step 'charge': retry.max_attempts must be an integer"),
    ):
        load(bad, environment="development")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([{"name": "chrage"}], "step 'chrage' is not a step of this template"),
        (
            [{"name": "all", "timeout_seconds": 3}],
            "step 'all' is not a step of this template (name ALL",
        ),
        (
            [{"name": "charge"}, {"name": "charge"}],
            "step 'charge' is overridden twice in environments.test",
        ),
        ([{"timeout_seconds": 3}], "environments.test: step #1: name is required"),
        (["charge"], "environments.test: step #1 must be a mapping"),
        ([{"name": "ALL", "timeout_seconds": -1}], "timeout_seconds must be a number above 0"),
        (
            [{"name": "charge", "handler": {"initialization": "x"}}],
            "handler.initialization must be a mapping",
        ),
    ],
)
def test_bad_overrides_are_refused(overrides: list[Any], message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=re.escape(message)):
        load(edited(on_environment(*overrides)), environment="test")


def test_an_override_does_not_change_the_template_it_came_from() -> None:
    template = edited(
        on_environment({"name": "ALL", "retry": {"max_attempts": 7}, "timeout_seconds": 4})
    )
    before = copy.deepcopy(template)
    checked = check_template(template, environment="test")
    assert template == before
    assert [s["retry"]["max_attempts"] for s in checked.template["steps"]] == [7, 7]
    assert "environments" not in checked.template


def test_environment_names_must_be_strings() -> None:
    with pytest.raises(
        tasker.WorkflowDefinitionError, match="environment must be a non-empty string"
    ):
        load(BASE, environment="")


# -- the same strictness for definitions written in Python -----------------------------------------


def noop(ctx: tasker.StepContext) -> None:
    return None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depends_on": "ab"}, r"write \['ab'\] for one"),
        ({"depends_on": ["validate", "validate"]}, "lists 'validate' more than once"),
        ({"depends_on": [1]}, "must list step names"),
        ({"max_attempts": 2.9}, "max_attempts must be a whole number, got 2.9"),
        ({"max_attempts": True}, "max_attempts must be a whole number"),
        ({"max_attempts": 0}, "between 1 and 1000"),
        ({"retryable": "no"}, "retryable must be True or False, got 'no'"),
        ({"retryable": 1}, "retryable must be True or False, got 1"),
        ({"timeout": "30"}, "timeout must be a number of seconds"),
        ({"timeout": math.nan}, "timeout must be a number of seconds"),
        ({"timeout": True}, "timeout must be a number of seconds"),
        (
            {"backoff": {"base_seconds": 1}},
            "backoff must be a tasker.BackoffPolicy or None, got dict",
        ),
        ({"breaker": "Payments"}, "breaker 'Payments' is invalid"),
        ({"breaker": 7}, "breaker 7 is invalid"),
        ({"breaker": "database"}, "the workers' own database breaker"),
        ({"inputs": [("a", 1)]}, "inputs of step 'charge' must be a mapping, got the list"),
        ({"inputs": {1: "a"}}, "key 1 is an int; JSON keys are strings"),
        (
            {"inputs": {"when": datetime.date(2024, 1, 1)}},
            r'inputs of step \'charge\'\["when"\] must be JSON',
        ),
    ],
)
def test_python_step_arguments_are_as_strict(kwargs: dict[str, Any], message: str) -> None:
    flow = tasker.Workflow("shop", "order", "1.0.0", register=False)
    flow.step("validate")(noop)
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        flow.step("charge", **kwargs)(noop)
    assert list(flow.steps) == ["validate"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 1.0}, "quote the version"),
        ({"version": "1.0"}, r"e\.g\. '1\.0\.0'"),
        ({"description": None}, "description must be a string"),
        ({"identity_strategy": "sometimes"}, "identity_strategy 'sometimes' is unknown"),
        ({"backoff": 2}, "backoff must be a tasker.BackoffPolicy, got int"),
        ({"input_schema": {"type": "integr"}}, "input_schema.*is not valid JSON Schema"),
        ({"input_schema": "object"}, "input_schema must be a mapping"),
        ({"metadata": ["a"]}, "metadata must be a mapping"),
    ],
)
def test_python_workflow_arguments_are_as_strict(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        tasker.Workflow("shop", "order", register=False, **kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_seconds", "1"),
        ("multiplier", True),
        ("max_seconds", math.inf),
        ("jitter", math.nan),
        ("base_seconds", None),
    ],
)
def test_backoff_policies_take_finite_numbers_only(field: str, value: Any) -> None:
    with pytest.raises(
        tasker.WorkflowDefinitionError, match=f"Backoff {field} must be a finite number"
    ):
        tasker.BackoffPolicy(**{field: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"handler_path": ""}, "handler_path must name the handler"),
        ({"handler_path": None}, "handler_path must name the handler"),
        ({"depends_on": "validate"}, r"write \['validate'\] for one"),
        ({"description": 5}, "description must be a string"),
        ({"inputs": {"x": {1, 2}}}, r'inputs\["x"\] must be JSON: set is not JSON'),
    ],
)
def test_step_definitions_added_directly_are_checked(changes: dict[str, Any], message: str) -> None:
    flow = tasker.Workflow("shop", "order", "1.0.0", register=False)
    flow.step("validate")(noop)
    step = StepDefinition(**{"name": "charge", "handler_path": "shop:charge", **changes})
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        flow.add_step(step)


def test_a_step_breaker_is_kept_in_the_template_and_read_back() -> None:
    flow = tasker.Workflow("shop", "order", "1.0.0", register=False)
    flow.step("charge", breaker="payments")(noop)
    flow.step("ship", depends_on=["charge"])(noop)
    template = flow.to_template()
    assert template["steps"][0]["breaker"] == "payments"
    assert "breaker" not in template["steps"][1]
    back = tasker.Workflow.from_template(template, resolve_handlers=False, register=False)
    assert back.steps["charge"].breaker == "payments"
    assert back.steps["ship"].breaker is None


def test_a_yaml_step_declares_a_breaker(tmp_path: Path) -> None:
    path = _yaml_template(tmp_path, "    breaker: payments\n")
    flow = tasker.Workflow.from_yaml(path, resolve_handlers=False, register=False)
    assert flow.steps["charge"].breaker == "payments"
    bad = _yaml_template(tmp_path, "    breaker: Pay Ments\n")
    with pytest.raises(tasker.WorkflowDefinitionError, match="breaker 'Pay Ments' is invalid"):
        tasker.Workflow.from_yaml(bad, resolve_handlers=False, register=False)


def test_python_input_schema_and_metadata_are_kept_in_the_template() -> None:
    schema = {"type": "object", "required": ["order"]}
    flow = tasker.Workflow(
        "shop", "order", "1.0.0", input_schema=schema, metadata={"team": "a"}, register=False
    )
    flow.step("validate")(noop)
    schema["required"].append("mutated later")  # the workflow keeps its own copy
    template = flow.to_template()
    assert template["input_schema"] == {"type": "object", "required": ["order"]}
    assert template["metadata"] == {"team": "a"}
    assert load(template).input_schema == flow.input_schema


def test_inputs_are_not_coerced_from_pairs() -> None:
    flow = tasker.Workflow("shop", "order", "1.0.0", register=False)
    flow.step("validate", inputs={"a": 1})(noop)
    assert flow.steps["validate"].inputs == {"a": 1}


@given(
    base=st.floats(0, 3600),
    multiplier=st.floats(1, 10),
    cap=st.floats(0, 86400),
    jitter=st.floats(0, 0.99),
    whole_ms=st.booleans(),
)
def test_backoff_settings_survive_the_template_round_trip(
    base: float, multiplier: float, cap: float, jitter: float, whole_ms: bool
) -> None:
    if whole_ms:  # the common case: whole milliseconds read back exactly
        base, cap = round(base * 1000) / 1000, round(cap * 1000) / 1000
    policy = tasker.BackoffPolicy(base, multiplier, cap, jitter)
    flow = tasker.Workflow("shop", "order", "1.0.0", backoff=policy, register=False)
    flow.step("validate", backoff=policy)(noop)
    again = load(flow.to_template())
    for loaded in (again.backoff, again.step_policy("validate")):
        assert loaded.multiplier == multiplier and loaded.jitter == jitter
        assert math.isclose(loaded.base_seconds, base, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(loaded.max_seconds, cap, rel_tol=1e-12, abs_tol=1e-15)
        if whole_ms:
            assert (loaded.base_seconds, loaded.max_seconds) == (base, cap)


def test_workflows_take_semantic_versions_of_any_length() -> None:
    flow = tasker.Workflow("ns", "wf", version="2024.1.1-rc.1.build.12345678", register=False)
    assert flow.version == "2024.1.1-rc.1.build.12345678"
    assert tasker.Workflow("ns", "wf", register=False).version == "0.1.0"
    with pytest.raises(tasker.WorkflowDefinitionError, match=r"e\.g\. '1\.0\.0'"):
        tasker.Workflow("ns", "wf", version="1.0", register=False)


def test_the_docs_list_every_field_of_the_schema() -> None:
    from tasker.workflow import templates

    docs = (Path(__file__).parents[1] / "docs" / "workflows.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Templates") :]
    tables = [
        ("", templates._TEMPLATE),
        ("", templates._STEP),
        ("handler.", templates._HANDLER),
        ("retry.", templates._RETRY),
        ("", templates._BACKOFF_NUMBERS),
        ("", templates._LIFECYCLE),
        ("", templates._STEP_OVERRIDE),
    ]
    missing = [
        f"{prefix}{name}"
        for prefix, fields in tables
        for name in fields
        if f"`{prefix}{name}`" not in section
    ]
    assert not missing, f"docs/workflows.md (Templates) does not list {missing}"


def _yaml_template(tmp_path: Path, step_fields: str) -> Path:
    path = tmp_path / "order.yaml"
    path.write_text(
        "name: order\nnamespace_name: shop\nversion: '1.0.0'\nsteps:\n"
        "  - name: charge\n    handler: {callable: 'shop.steps:charge'}\n" + step_fields,
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("    retry: {retryable: yes}\n", "retry.retryable must be true or false .* got 'yes'"),
        ("    retry: {retryable: off}\n", "got 'off'"),
        ("    timeout_seconds: 1:30\n", "timeout_seconds must be a number, got '1:30'"),
        ("    retry: {max_attempts: 1_0}\n", "must be an integer, got '1_0'"),
    ],
)
def test_yaml_reads_plain_words_as_strings_not_booleans_or_sexagesimals(
    tmp_path: Path, fields: str, message: str
) -> None:
    """YAML 1.2 core schema: what YAML 1.1 would turn into another value is a string, and then
    refused where a boolean or number is needed."""
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        tasker.Workflow.from_yaml(_yaml_template(tmp_path, fields), resolve_handlers=False)


def test_yaml_values_are_read_as_written(tmp_path: Path) -> None:
    fields = (
        "    handler:\n      callable: 'shop.steps:charge'\n      initialization:\n"
        "        country: NO\n        mode: 0755\n        day: 2024-01-01\n        at: 12:30\n"
        "        mask: 0x1F\n        perms: 0o17\n        big: 1e5\n        none: ~\n"
        "        flag: true\n"
    )
    path = tmp_path / "order.yaml"
    path.write_text(
        "name: order\nnamespace_name: shop\nversion: '1.0.0'\nsteps:\n  - name: charge\n" + fields,
        encoding="utf-8",
    )
    flow = tasker.Workflow.from_yaml(path, resolve_handlers=False, register=False)
    assert flow.steps["charge"].inputs == {
        "country": "NO",
        "mode": 755,
        "day": "2024-01-01",
        "at": "12:30",
        "mask": 31,
        "perms": 15,
        "big": 100000.0,
        "none": None,
        "flag": True,
    }


@pytest.mark.parametrize(
    ("names", "environment", "warned"),
    [
        (["prodution"], "production", ["environments.prodution applies only", "'prodution'?"]),
        (["staging", "developmnt"], "test", ["did you mean 'development'?"]),
        (
            ["production"],
            "prod",
            ["no overrides for the current environment 'prod' (the environment argument)"],
        ),
    ],
)
def test_a_misspelt_environment_is_warned_about(
    names: list[str], environment: str, warned: list[str]
) -> None:
    template = copy.deepcopy(BASE)
    template["environments"] = {name: {"steps": [{"name": "charge"}]} for name in names}
    with pytest.warns(tasker.TemplateWarning) as caught:
        load(template, environment=environment)
    text = " | ".join(str(w.message) for w in caught)
    assert all(part in text for part in warned), text


def test_a_misspelt_tasker_env_is_named_as_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKER_ENV", "prodution")
    template = copy.deepcopy(BASE)
    template["environments"] = {"production": {"steps": [{"name": "charge"}]}}
    with pytest.warns(tasker.TemplateWarning, match=r"'prodution' \(TASKER_ENV\)"):
        load(template)


def test_matching_environments_are_not_warned_about() -> None:
    template = copy.deepcopy(BASE)
    template["environments"] = {"production": {}, "test": {}, "eu_west": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(template, environment="production")
        load(template, environment="eu_west")


@pytest.mark.parametrize("written", ["TEST", "Test", " test ", "test"])
def test_the_environment_is_read_in_lower_case_as_the_settings_read_it(
    written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TASKER_ENV=TEST runs the test settings; it applies the test overrides too."""
    template = copy.deepcopy(BASE)
    template["environments"] = {"test": {"steps": [{"name": "charge", "timeout_seconds": 7}]}}
    monkeypatch.setenv("TASKER_ENV", written)
    assert tasker.load_settings().env == "test"
    assert load(template).steps["charge"].timeout == 7
    monkeypatch.delenv("TASKER_ENV")
    assert load(template, environment=written).steps["charge"].timeout == 7


@pytest.mark.parametrize("key", ["Production", "PRODUCTION", " production"])
def test_an_environment_key_that_is_not_lower_case_is_refused(key: str) -> None:
    template = copy.deepcopy(BASE)
    template["environments"] = {key: {}}
    with pytest.raises(tasker.WorkflowDefinitionError, match="write 'production'"):
        load(template)


_HEAD = (
    'name: w\nnamespace_name: ns\nversion: 1.0.0\nsteps: [{name: a, handler: {callable: "m:f"}}]\n'
)


def _laughs(levels: int) -> str:
    lines = ["metadata:", '  l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, levels + 1):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return _HEAD + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_laughs(6), "expands to more than 200,000 values"),  # 9^7: 4.8 million
        (_laughs(9), "expands to more than 200,000 values"),  # billions: refused as fast
        (_HEAD + "metadata: &m {x: *m}\n", "document contains itself"),
        (_HEAD + "metadata: {a: &l [1, *l]}\n", "document contains itself"),
    ],
    ids=["laughs_6", "laughs_9", "mapping_in_itself", "list_in_itself"],
)
def test_yaml_aliases_that_blow_up_or_loop_are_refused(
    text: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        tasker.Workflow.from_yaml(path, resolve_handlers=False, register=False)


def test_shared_yaml_anchors_still_work(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "name: w\nnamespace_name: ns\nversion: 1.0.0\nsteps:\n"
        '  - {name: a, handler: {callable: "m:f"}, retry: &r {max_attempts: 5}}\n'
        '  - {name: b, handler: {callable: "m:f"}, retry: *r}\n'
        "metadata: {l1: &l1 [1, 2, 3], l2: [*l1, *l1, *l1]}\n"
    )
    flow = tasker.Workflow.from_yaml(path, resolve_handlers=False, register=False)
    assert flow.steps["b"].max_attempts == 5
    assert flow.metadata["l2"] == [[1, 2, 3]] * 3

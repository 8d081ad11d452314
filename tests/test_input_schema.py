"""A workflow's input_schema: checked when loaded, and the messages of validate_input."""

from __future__ import annotations

from typing import Any

import pytest

import tasker
from tasker.workflow.input_schema import check_input_schema, context_path, validate_input

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order"],
    "properties": {
        "order": {
            "type": "object",
            "required": ["qty"],
            "properties": {"qty": {"type": "integer", "minimum": 1}},
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku"],
                "properties": {"sku": {"type": "string"}},
            },
        },
    },
}


def test_a_valid_schema_is_accepted_as_given() -> None:
    assert check_input_schema(ORDER_SCHEMA) is ORDER_SCHEMA


def test_the_declared_draft_is_the_one_checked() -> None:
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "object",
        "properties": {
            "qty": {
                "type": "integer",
                "minimum": 1,
                "exclusiveMinimum": True,  # a boolean in draft 4, a number since draft 6
            }
        },
    }
    check_input_schema(draft4)
    without_draft = {key: value for key, value in draft4.items() if key != "$schema"}
    with pytest.raises(tasker.WorkflowDefinitionError, match=r"2020-12.*not of type 'number'"):
        check_input_schema(without_draft)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "integr"}, r"input_schema\[\"type\"\] is not valid JSON Schema"),
        (
            {"properties": {"qty": {"minimum": "1"}}},
            r"input_schema\[\"properties\"\]\[\"qty\"\]\[\"minimum\"\] is not valid.*'1' is not of",
        ),
        ({"required": "order"}, r"\[\"required\"\] is not valid"),
        ({"$schema": "https://example.com/my-draft"}, "names no JSON Schema draft Tasker knows"),
        ({"$schema": 7}, r"\[\"\$schema\"\] must be a string"),
        ([{"type": "object"}], "must be a JSON Schema object"),
        (True, "must be a JSON Schema object"),
    ],
)
def test_invalid_schemas_are_refused_naming_the_place(schema: Any, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        check_input_schema(schema)


def test_a_context_that_satisfies_the_schema_passes() -> None:
    validate_input(ORDER_SCHEMA, {"order": {"qty": 2}, "items": [{"sku": "a"}]})


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"order": {"qty": -1}}, 'context["order"]["qty"]: -1 is less than the minimum of 1'),
        ({}, "context: 'order' is a required property"),
        ({"order": {"qty": "2"}}, "context[\"order\"][\"qty\"]: '2' is not of type 'integer'"),
        (
            {"order": {"qty": 1}, "items": [{"sku": "a"}, {"sku": 5}]},
            'context["items"][1]["sku"]: 5 is not of type \'string\'',
        ),
        ([], "context: [] is not of type 'object'"),
    ],
)
def test_refused_contexts_name_the_path_and_the_problem(context: Any, message: str) -> None:
    with pytest.raises(tasker.PayloadError) as caught:
        validate_input(ORDER_SCHEMA, context)
    assert str(caught.value) == message


def test_several_failures_report_the_best_one_and_count_the_rest() -> None:
    context = {"order": {"qty": 0}, "items": [{"sku": 1}]}
    with pytest.raises(tasker.PayloadError, match=r"^context\[.*\(and 1 more\)$"):
        validate_input(ORDER_SCHEMA, context)


def test_the_path_quotes_keys_as_json() -> None:
    assert context_path(["a b", 0, 'say "hi"']) == 'context["a b"][0]["say \\"hi\\""]'
    assert context_path([]) == "context"


def _with_property(reference: str, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"a": {"$ref": reference}}, **extra}


@pytest.mark.parametrize(
    "schema",
    [
        _with_property("#/$defs/missing", **{"$defs": {"other": {"type": "string"}}}),
        _with_property("#/definitions/a"),
        _with_property("https://example.com/address.json"),
        _with_property("address.json"),
        {"type": "object", "$defs": {"a": {"items": {"$ref": "#/nowhere"}}}},
    ],
    ids=["missing_pointer", "missing_definitions", "url", "relative_file", "nested"],
)
def test_a_reference_that_does_not_resolve_inside_the_schema_is_refused(
    schema: dict[str, Any],
) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=r'\["\$ref"\] .* does not resolve'):
        check_input_schema(schema)


@pytest.mark.parametrize(
    "schema",
    [
        _with_property("#/$defs/a", **{"$defs": {"a": {"type": "string"}}}),
        _with_property(
            "#/definitions/a",
            **{
                "$schema": "http://json-schema.org/draft-07/schema#",
                "definitions": {"a": {"type": "string"}},
            },
        ),
        _with_property(
            "sub.json",
            **{
                "$id": "https://example.com/root.json",
                "$defs": {"s": {"$id": "sub.json", "type": "string"}},
            },
        ),
        {"type": "object", "properties": {"tree": {"$ref": "#"}}},
    ],
    ids=["defs", "draft7_definitions", "id_of_a_subschema", "recursive"],
)
def test_references_inside_the_schema_are_accepted_and_applied(schema: dict[str, Any]) -> None:
    check_input_schema(schema)
    validate_input(schema, {"a": "text"})
    if "tree" not in schema["properties"]:
        with pytest.raises(tasker.PayloadError, match=r'context\["a"\]: 5 is not of type'):
            validate_input(schema, {"a": 5})


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"type": "object", "allOf": [{"$ref": "#"}]},
        _with_property(
            "#/$defs/a", **{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
        ),
        _with_property(
            "#/$defs/a", **{"$defs": {"a": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/a"}]}}}
        ),
        _with_property("#/$defs/a", **{"$defs": {"a": {"not": {"$ref": "#/$defs/a"}}}}),
        _with_property("#/$defs/a", **{"$defs": {"a": {"if": {"$ref": "#/$defs/a"}}}}),
        _with_property(
            "#/$defs/a", **{"$defs": {"a": {"dependentSchemas": {"k": {"$ref": "#/$defs/a"}}}}}
        ),
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "definitions": {"a": {"oneOf": [{"$ref": "#/definitions/a"}]}},
        },
    ],
    ids=["root", "allOf_root", "two_defs", "anyOf", "not", "if", "dependentSchemas", "draft7"],
)
def test_a_reference_loop_that_never_descends_into_the_context_is_refused(
    schema: dict[str, Any],
) -> None:
    """Each would recurse until Python gives up at every submit; a loop through properties or
    items (a tree) is fine, see test_references_inside_the_schema_are_accepted_and_applied."""
    with pytest.raises(tasker.WorkflowDefinitionError, match="refers back to itself"):
        check_input_schema(schema)


def test_recursive_schemas_that_descend_are_accepted() -> None:
    node = {
        "type": "object",
        "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "additionalProperties": {"$ref": "#/$defs/node"},
    }
    schema = {
        "type": "object",
        "$defs": {"node": node},
        "properties": {"a": {"$ref": "#/$defs/node"}},
    }
    check_input_schema(schema)
    validate_input(schema, {"a": {"kids": [{"kids": []}, {"x": {"kids": []}}]}})
    with pytest.raises(tasker.PayloadError, match="is not of type 'object'"):
        validate_input(schema, {"a": {"kids": [{"kids": [5]}]}})


@pytest.mark.parametrize("kind", ["array", "string", ["array", "null"]])
def test_a_top_level_type_that_refuses_every_context_is_refused(kind: Any) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match="a task context is always an object"):
        check_input_schema({"type": kind})
    check_input_schema({"type": ["object", "null"]})


def test_a_schema_stored_before_these_checks_fails_the_submit_plainly() -> None:
    with pytest.raises(tasker.PayloadError, match="the workflow's input_schema cannot be applied"):
        validate_input(_with_property("#/$defs/gone"), {"a": 1})


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (_with_property("#nope"), "does not resolve"),  # an anchor that does not exist
        ({"type": "object", "properties": {"a": {"$dynamicRef": "#nope"}}}, "does not resolve"),
        ({"type": "object", "$ref": "#/type"}, 'points at the str "object", not at a schema'),
        (_with_property("#/required", required=["a"]), "points at the list"),
        ({"enum": [1, 2]}, r'\["enum"\] allows no object'),
        ({"const": "x"}, r'\["const"\] allows no object'),
    ],
    ids=["anchor", "dynamicRef", "ref_to_a_string", "ref_to_a_list", "enum", "const"],
)
def test_references_and_top_levels_no_context_could_pass_are_refused(
    schema: dict[str, Any], message: str
) -> None:
    """Each loaded before, and then every submit failed (or none could pass)."""
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        check_input_schema(schema)


def test_dynamic_references_to_an_anchor_and_objects_in_enum_are_accepted() -> None:
    schema = {
        "type": "object",
        "$defs": {"node": {"$dynamicAnchor": "node", "type": "object"}},
        "properties": {"a": {"$dynamicRef": "#node"}},
    }
    check_input_schema(schema)
    validate_input(schema, {"a": {}})
    with pytest.raises(tasker.PayloadError, match="is not of type 'object'"):
        validate_input(schema, {"a": 1})
    check_input_schema({"enum": [{"kind": "a"}, 2]})

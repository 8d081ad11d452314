"""One payload rule for task contexts and step results: exact JSON, or refused with the place and
the fix (docs/workflows.md, "Contexts and results")."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

import tasker
from tasker.engine.outcomes import run_handler
from tasker.workflow.payloads import MAX_NESTING, check_payload, encode_json
from tests.support import InProcessFlows, scalar


@dataclasses.dataclass
class Point:
    x: int


class Color(enum.IntEnum):
    RED = 1


class Label(str):
    """A str subclass (msgspec alone refuses it)."""


class Count(int):
    pass


class Ratio(float):
    pass


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


REFUSED: dict[str, tuple[Any, str]] = {
    "decimal": ({"items": [{}, {}, {}, {"price": Decimal("1.10")}]}, "Decimal is not JSON"),
    "bytes": ({"x": b"abc"}, "bytes is not JSON; decode it"),
    "bytearray": ({"x": bytearray(b"abc")}, "bytearray is not JSON"),
    "set": ({"x": {1, 2}}, "set is not JSON; convert it to a list"),
    "frozenset": ({"x": frozenset()}, "frozenset is not JSON"),
    "datetime": ({"x": dt.datetime(2026, 1, 1)}, "datetime is not JSON; convert it to an ISO"),
    "date": ({"x": dt.date(2026, 1, 1)}, "date is not JSON"),
    "timedelta": ({"x": dt.timedelta(seconds=3)}, "timedelta is not JSON"),
    "uuid": ({"x": uuid.uuid4()}, "UUID is not JSON; convert it to str"),
    "dataclass": ({"x": Point(1)}, "Point is not JSON"),
    "object": ({"x": object()}, "object is not JSON"),
    "int_key": ({1: "a"}, "is an int; JSON keys are strings"),
    "keys_that_collide": ({1: "a", "1": "b"}, "JSON keys are strings"),
    "tuple_key": ({(1, 2): "a"}, "is a tuple"),
    "int_beyond_64_bits": ({"x": 2**64}, "beyond 64 bits"),
    "nan": ({"x": float("nan")}, "nan is not JSON"),
    "infinity": ({"x": [float("-inf")]}, "-inf is not JSON"),
    "nul_in_value": ({"x": "a\x00"}, "NUL character"),
    "nul_in_key": ({"a\x00b": 1}, "the key contains a NUL"),
    "surrogate_in_value": ({"x": "\ud800"}, "lone surrogate"),
    "surrogate_in_key": ({"\udfff": 1}, "the key contains a lone surrogate"),
    "too_deep": ({"x": _deep(MAX_NESTING)}, f"nested more than {MAX_NESTING} levels"),
    # whole floats whose decimal form is not exact: jsonb would hand back a different int
    "inexact_whole_float": ({"x": 2.0**60}, "would read back as the int 1152921504606847000"),
    "inexact_whole_float_negative": ({"x": [-(2.0**62)]}, "whole number that jsonb"),
    "inexact_whole_float_in_a_dict": ({"a": 1, "b": 1.2345678901234567e18}, "1234567890123456800"),
}


@pytest.mark.parametrize("value,message", REFUSED.values(), ids=REFUSED.keys())
def test_values_that_would_not_read_back_equal_are_refused(value: Any, message: str) -> None:
    with pytest.raises(tasker.PayloadError, match=message):
        check_payload(value, "result")


def test_the_error_names_the_place_inside_the_value_and_the_fix() -> None:
    value = {"items": [{}, {}, {}, {"price": Decimal("1.10")}]}
    with pytest.raises(tasker.PayloadError) as caught:
        check_payload(value, "result")
    assert str(caught.value) == (
        'result["items"][3]["price"]: Decimal is not JSON; convert it to str (exact) or float'
    )
    with pytest.raises(tasker.PayloadError) as caught:
        check_payload({"a": {7: 1}}, "context")
    assert str(caught.value).startswith('context["a"][{7}]: key 7 is an int')


def test_long_paths_are_shortened() -> None:
    with pytest.raises(tasker.PayloadError) as caught:
        check_payload({"x": _deep(300)}, "result")
    assert len(str(caught.value)) < 300


ACCEPTED: dict[str, tuple[Any, Any]] = {
    "plain": ({"a": [1, 2.5, "x", True, None]}, {"a": [1, 2.5, "x", True, None]}),
    "tuple_reads_back_as_a_list": ({"t": (1, 2)}, {"t": [1, 2]}),
    "int_enum_reads_back_as_its_int": ({"c": Color.RED}, {"c": 1}),
    "1e16_reads_back_as_an_int": ({"n": 1e16}, {"n": 10_000_000_000_000_000}),
    "minus_zero_reads_back_as_zero": ({"n": -0.0}, {"n": 0}),
    "64_bit_ints": ({"n": [2**63 - 1, -(2**63)]}, {"n": [2**63 - 1, -(2**63)]}),
    "deep_but_allowed": ({"x": _deep(MAX_NESTING - 5)}, {"x": _deep(MAX_NESTING - 5)}),
    # floats beyond 64 bits: jsonb writes them as long whole numbers; they read back as floats
    "float_1e19": ({"n": 1e19}, {"n": 1e19}),
    "float_1e23_not_exact_in_binary": ({"n": 1e23}, {"n": 1e23}),
    "float_huge": (
        {"n": [1.5e300, -1.7976931348623157e308]},
        {"n": [1.5e300, -1.7976931348623157e308]},
    ),
    "float_tiny": (
        {"n": [5e-324, 2.2250738585072014e-308]},
        {"n": [5e-324, 2.2250738585072014e-308]},
    ),
    "whole_float_exact_in_decimal": ({"n": 4.5e18}, {"n": 4_500_000_000_000_000_000}),
    "subclasses_read_back_as_base_types": (
        {Label("k"): [Label("v"), Count(3), Ratio(0.5)]},
        {"k": ["v", 3, 0.5]},
    ),
}


@pytest.mark.parametrize("value,read_back", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_values_read_back_numerically_equal(
    flows: InProcessFlows, value: Any, read_back: Any
) -> None:
    flow = tasker.Workflow("payloads", "echo", version="1.0.0", register=False)
    flow.step("echo")(lambda ctx: value)

    @flow.step(depends_on=["echo"])
    def seen(ctx: tasker.StepContext) -> Any:
        return {"context": dict(ctx.task_context), "parent": ctx.parent_results["echo"]}

    status = flows.run(flow, {"given": value})
    assert status.state == "complete"
    stored = status.step("echo").result
    assert _exactly(stored, read_back)
    assert status.step("seen").result == {"context": {"given": stored}, "parent": stored}


def _exactly(read: Any, expected: Any) -> bool:
    """Equal, and a float that read back is a float (not a long int)."""
    if isinstance(expected, float) and abs(expected) > 2**63:
        return type(read) is float and read == expected
    if isinstance(expected, dict):
        return (
            isinstance(read, dict)
            and read.keys() == expected.keys()
            and all(_exactly(read[key], expected[key]) for key in expected)
        )
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(read, list)
            and len(read) == len(expected)
            and all(_exactly(a, b) for a, b in zip(read, expected, strict=True))
        )
    return bool(read == expected)


@pytest.mark.parametrize("value,message", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_result_fails_the_step_for_good(
    flows: InProcessFlows, value: Any, message: str
) -> None:
    flow = tasker.Workflow("payloads", "refused", version="1.0.0", register=False)
    flow.step("bad", max_attempts=3)(lambda ctx: value)
    flow.step("after", depends_on=["bad"])(lambda ctx: {"ran": True})
    status = flows.run(flow)
    bad = status.step("bad")
    assert status.state == "blocked_by_failures" and bad.state == "error" and bad.attempts == 1
    assert bad.error is not None and bad.error["error_type"] == "payload_error"
    assert bad.error["message"].startswith("result") and message in bad.error["message"]
    assert status.step("after").state == "pending"


@pytest.mark.parametrize("value,message", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_context_fails_the_submit_before_anything_is_written(
    flows: InProcessFlows, value: Any, message: str
) -> None:
    flow = tasker.Workflow("payloads", "ctx", version="1.0.0", register=False)
    flow.step("only")(lambda ctx: None)
    flows.register(flow)
    with pytest.raises(tasker.PayloadError, match=message):
        flows.client.submit("payloads", "ctx", value)
    assert scalar(flows.url, "SELECT count(*) FROM tasker.tasks") == 0


def test_the_size_limit_is_a_setting(flows: InProcessFlows) -> None:
    assert tasker.load_settings("test").engine.max_payload_bytes == 1024 * 1024
    with pytest.raises(tasker.PayloadError, match="over the 100-byte limit"):
        encode_json({"x": "y" * 200}, "context", limit=100)
    client = tasker.Client(broker=flows.broker, max_payload_bytes=100)
    flow = tasker.Workflow("payloads", "small", version="1.0.0", register=False)
    flow.step("only")(lambda ctx: None)
    flows.register(flow)
    with pytest.raises(tasker.PayloadError, match=r"engine\.max_payload_bytes"):
        client.submit("payloads", "small", {"x": "y" * 200})


def test_the_size_limit_counts_the_result_itself_not_the_stored_document() -> None:
    value = {"x": "y" * 100}
    size = len(encode_json(value, "result"))
    context = tasker.StepContext(
        task_uuid="t", step_uuid="s", step_name="s", namespace="n", workflow="w",
        task_context={}, parent_results={}, inputs={}, attempt=1, max_attempts=1,
        correlation_id="c",
    )  # fmt: skip
    fits = run_handler(lambda ctx: value, context, max_bytes=size)
    assert fits.success and json.loads(fits.document)["result"] == value
    over = run_handler(lambda ctx: value, context, max_bytes=size - 1)
    assert not over.success and over.error_type == "payload_error"
    assert f"{size:,} bytes of JSON, over the {size - 1:,}-byte limit" in over.document

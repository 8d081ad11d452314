"""Semantic versions (semver 2.0.0): what is accepted, and precedence, against the spec's rules."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tasker
from tasker.workflow.versions import (
    MAX_VERSION_LENGTH,
    check_version,
    compare_versions,
    latest,
    version_key,
)

# -- a straightforward reference implementation of semver 2.0.0 §11, for comparison --------------


def reference_compare(a: str, b: str) -> int:
    """-1/0/1 following the text of semver 2.0.0 §11 step by step (ints, no clever keys)."""
    core_a, pre_a = _split(a)
    core_b, pre_b = _split(b)
    for x, y in zip(core_a, core_b, strict=True):  # §11.2: numerically, left to right
        if x != y:
            return -1 if x < y else 1
    if pre_a is None or pre_b is None:  # §11.3: a pre-release is lower than its release
        return (pre_a is None) - (pre_b is None)
    for x, y in zip(pre_a, pre_b, strict=False):  # §11.4
        if x == y:
            continue
        x_numeric, y_numeric = x.isdigit(), y.isdigit()
        if x_numeric and y_numeric:  # §11.4.1
            return -1 if int(x) < int(y) else 1
        if x_numeric != y_numeric:  # §11.4.3: numeric lower than alphanumeric
            return -1 if x_numeric else 1
        return -1 if x < y else 1  # §11.4.2: lexically, in ASCII order
    return (len(pre_a) > len(pre_b)) - (len(pre_a) < len(pre_b))  # §11.4.4


def _split(version: str) -> tuple[list[int], list[str] | None]:
    without_build = version.split("+", 1)[0]  # §10: build metadata is ignored
    core, dash, pre = without_build.partition("-")
    return [int(part) for part in core.split(".")], (pre.split(".") if dash else None)


# -- strategies ------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
numeric = st.one_of(
    st.integers(0, 12).map(str),
    st.integers(0, 10**30).map(str),  # well beyond 64 bits
)
alphanumeric = st.builds(
    lambda head, letter, tail: head + letter + tail,
    st.text("0123456789", max_size=3),
    st.sampled_from(_LETTERS),
    st.text("0123456789" + _LETTERS, max_size=4),
)
prerelease = st.lists(st.one_of(numeric, alphanumeric), min_size=1, max_size=4).map(".".join)
build = st.lists(st.text("0123456789" + _LETTERS, min_size=1, max_size=4), min_size=1, max_size=3)
versions = st.builds(
    lambda core, pre, meta: (
        ".".join(core) + (f"-{pre}" if pre else "") + (f"+{meta}" if meta else "")
    ),
    st.tuples(numeric, numeric, numeric),
    st.none() | prerelease,
    st.none() | build.map(".".join),
)


def _sign(key_a: object, key_b: object) -> int:
    return int(key_a > key_b) - int(key_a < key_b)  # type: ignore[operator]


@given(versions, versions)
def test_the_sort_key_orders_as_the_spec_says(a: str, b: str) -> None:
    assert _sign(version_key(a), version_key(b)) == reference_compare(a, b)
    assert compare_versions(a, b) == reference_compare(a, b)


@given(versions, versions)
def test_the_order_is_total_and_antisymmetric(a: str, b: str) -> None:
    ka, kb = version_key(a), version_key(b)
    assert [ka < kb, ka == kb, ka > kb].count(True) == 1
    assert compare_versions(a, b) == -compare_versions(b, a)


@given(versions, versions, versions)
def test_the_order_is_transitive(a: str, b: str, c: str) -> None:
    for x, y, z in itertools.permutations((a, b, c)):
        if compare_versions(x, y) <= 0 and compare_versions(y, z) <= 0:
            assert compare_versions(x, z) <= 0


@given(st.lists(versions, min_size=1, max_size=12))
def test_sorting_by_the_key_agrees_with_the_reference(items: list[str]) -> None:
    by_key = sorted(items, key=version_key)
    by_reference = sorted(items, key=functools.cmp_to_key(reference_compare))
    assert [version_key(v) for v in by_key] == [version_key(v) for v in by_reference]
    assert latest(items) is not None
    assert compare_versions(latest(items) or "", by_key[-1]) == 0


@given(versions, build.map(".".join), build.map(".".join))
def test_build_metadata_is_ignored(version: str, one: str, other: str) -> None:
    plain = version.split("+", 1)[0]
    assert compare_versions(f"{plain}+{one}", f"{plain}+{other}") == 0
    assert version_key(f"{plain}+{one}") == version_key(plain)


@given(versions)
def test_every_generated_version_is_accepted_as_written(version: str) -> None:
    if len(version) > MAX_VERSION_LENGTH:
        with pytest.raises(tasker.WorkflowDefinitionError, match="characters long"):
            check_version(version)
    elif "+" in version:  # a workflow version names one definition: no build metadata
        with pytest.raises(tasker.WorkflowDefinitionError, match="carries build metadata"):
            check_version(version)
    else:
        assert check_version(version) == version


@pytest.mark.parametrize("value", ["1.0.0+001", "1.0.0-rc.1+b.5", "2024.1.1+build.12345678"])
def test_build_metadata_is_refused_in_workflow_versions(value: str) -> None:
    release = value.split("+", maxsplit=1)[0]
    with pytest.raises(tasker.WorkflowDefinitionError, match=f"Use '{re.escape(release)}'"):
        check_version(value)
    assert version_key(value) == version_key(release)  # stored ones still sort


def test_the_spec_example_chain() -> None:
    chain = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "1.10.0",
        "2.0.0",
    ]
    for lower, higher in itertools.pairwise(chain):
        assert compare_versions(lower, higher) == -1, (lower, higher)
    assert sorted(reversed(chain), key=version_key) == chain
    assert latest(chain) == "2.0.0"


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0.0-rc.1", "1.0.0-rc1"),  # 'rc' < 'rc1': the shorter alphanumeric one is lower
        ("1.0.0-rc.2", "1.0.0-rc.10"),  # numeric identifiers: 2 < 10
        ("1.0.0-rc10", "1.0.0-rc2"),  # alphanumeric ones: lexical, '1' < '2'
        ("1.0.0-1", "1.0.0-a"),  # numeric lower than alphanumeric
        ("1.0.0-0a", "1.0.0-a"),  # '0a' is alphanumeric: lexical, '0' < 'a'
        ("1.0.0-Z", "1.0.0-a"),  # ASCII order: upper case first
        ("1.0.0-alpha", "1.0.0-alpha.0"),  # more fields win when all before are equal
        ("1.0.99999999999999", "1.0.100000000000000"),  # 14 and 15 digits
        ("99999999999999999999.0.0", "100000000000000000000.0.0"),  # beyond 64 bits
        ("1.9.0", "1.10.0"),
        ("0.0.0", "0.0.1"),
    ],
)
def test_precedence_edge_cases(lower: str, higher: str) -> None:
    assert compare_versions(lower, higher) == -1
    assert compare_versions(higher, lower) == 1
    assert reference_compare(lower, higher) == -1


def test_numerals_longer_than_python_converts_still_compare() -> None:
    big = "9" * 5000  # int() refuses numerals over 4,300 digits
    assert compare_versions(f"1.0.{big}", f"1.0.1{big}") == -1
    assert compare_versions(f"1.0.0-{big}", f"1.0.0-1{big}") == -1


def test_latest_of_nothing_is_none_and_equals_keep_the_first() -> None:
    assert latest([]) is None
    assert latest(["1.0.0+b", "1.0.0+a", "0.9.0"]) == "1.0.0+b"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.0", r"use MAJOR\.MINOR\.PATCH, e\.g\. '1\.0\.0'"),
        ("1.10", r"e\.g\. '1\.10\.0'"),
        ("1", r"e\.g\. '1\.0\.0'"),
        ("1.0.0.0", "MAJOR.MINOR.PATCH"),
        (1.1, r"quote the version.*version: \"1\.10\.0\""),
        (1, "quote the version"),
        (True, "must be a string"),
        (None, "must be a string"),
        ("01.0.0", r"leading zero in '01'.*write '1\.0\.0'"),
        ("1.00.0", "leading zero"),
        ("1.0.00", "leading zero"),
        ("1.0.0-01", "leading zero in the pre-release identifier '01'"),
        ("1.0.0-rc.00", "leading zero"),
        ("v1.0.0", "drop the leading 'v'"),
        ("", "MAJOR.MINOR.PATCH"),
        (" 1.0.0", "MAJOR.MINOR.PATCH"),
        ("1.0.0 ", "invalid|MAJOR"),
        ("1.0.0-", "invalid pre-release part"),
        ("1.0.0-a..b", "invalid pre-release part"),
        ("1.0.0-a_b", "invalid pre-release part"),
        ("1.0.0+", "invalid build part"),
        ("1.0.0+a+b", "invalid build part"),
        ("1.0.0+a..b", "invalid build part"),
        ("1.a.0", "MAJOR.MINOR.PATCH"),
        ("-1.0.0", "MAJOR.MINOR.PATCH"),
        ("1.0.0-é", "invalid pre-release part"),
        ("\uff11.0.0", "MAJOR.MINOR.PATCH"),  # a full-width digit is not an ASCII digit
    ],
)
def test_invalid_versions_are_refused_with_the_fix(value: object, message: str) -> None:
    with pytest.raises(tasker.WorkflowDefinitionError, match=message):
        check_version(value)


@pytest.mark.parametrize(
    "value", ["0.0.0", "1.0.0-0", "1.0.0-0a", "1.0.0-x-y-z.--", "1.0.0-rc.1", "99999999999.0.0"]
)
def test_valid_edge_versions_are_accepted(value: str) -> None:
    assert check_version(value) == value


def test_a_version_is_at_most_128_characters() -> None:
    longest = "1.0.0-" + "a" * (MAX_VERSION_LENGTH - 6)
    assert check_version(longest) == longest
    for too_long in (longest + "b", "1.0.0-" + "x" * 100_000, "1" * 300 + ".0.0"):
        with pytest.raises(tasker.WorkflowDefinitionError, match="at most 128"):
            check_version(too_long)

"""Semantic versions of workflow definitions (semver 2.0.0): validation and precedence.

A workflow's version is ``MAJOR.MINOR.PATCH`` with an optional ``-prerelease`` and ``+build``
(https://semver.org/spec/v2.0.0.html)::

    1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-alpha.beta < 1.0.0-beta < 1.0.0-beta.2
      < 1.0.0-beta.11 < 1.0.0-rc.1 < 1.0.0 < 1.0.1 < 1.10.0

Numeric parts may be of any length: they are compared as integers, never as fixed-width ones.
Since semver forbids leading zeros, the integer order is the order of (number of digits,
digits), which :func:`version_key` uses so that no numeral is ever converted (Python refuses to
convert numerals of more than 4,300 digits).

Build metadata (``+build``) does not take part in precedence: ``1.0.0+a`` and ``1.0.0+b`` are
equal, though they are different strings. So a workflow's version may not carry any
(:func:`check_version` refuses it): two definitions registered as ``1.0.0+a`` and ``1.0.0+b``
would be two versions to Tasker and one to semver. :func:`version_key` still orders such
versions.
"""

from __future__ import annotations

from collections.abc import Iterable

from tasker.exceptions import WorkflowDefinitionError

__all__ = [
    "MAX_VERSION_LENGTH",
    "VersionKey",
    "check_version",
    "compare_versions",
    "latest",
    "version_key",
]

#: The longest workflow version accepted (semver sets no limit; Tasker's names need one).
MAX_VERSION_LENGTH = 128
_ALPHANUMERIC = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-")
_DIGITS = frozenset("0123456789")

#: A numeral as (number of digits, digits): ordered as the integer it writes.
Numeral = tuple[int, str]
#: A pre-release identifier: (0, digits, numeral) for a numeric one, (1, 0, text) otherwise.
Identifier = tuple[int, int, str]
#: What :func:`version_key` returns: major, minor, patch, then (1, ()) for a release or
#: (0, identifiers) for a pre-release, so that a release sorts after its pre-releases.
VersionKey = tuple[Numeral, Numeral, Numeral, tuple[int, tuple[Identifier, ...]]]


def check_version(value: object) -> str:
    """``value`` as a plain ``str`` if it is a semver 2.0 version string without build metadata
    (a ``str`` subclass such as a string ``Enum`` member gives the text it holds); else a
    :class:`WorkflowDefinitionError`.

    The message names the fix: quote a version that YAML read as a number, write three parts,
    drop leading zeros, a leading ``v`` or the ``+build`` part.
    """
    if not isinstance(value, str):
        raise WorkflowDefinitionError(_not_a_string(value))
    value = str.__str__(value)  # a str subclass (a str Enum member) as the text it holds
    if len(value) > MAX_VERSION_LENGTH:
        raise WorkflowDefinitionError(
            f"version {value[:20]!r}... is {len(value):,} characters long; a workflow version "
            f"may have at most {MAX_VERSION_LENGTH} (it is part of every step's actor name)."
        )
    version_key(value)
    if "+" in value:
        release, _, build = value.partition("+")
        raise WorkflowDefinitionError(
            f"version {value!r} carries build metadata ('+{build}'), which semver ignores: "
            f"'{release}+a' and '{release}+b' would be one version with two definitions. Use "
            f"{release!r}, and bump the version when the definition changes."
        )
    return value


def version_key(version: object) -> VersionKey:
    """The sort key of ``version``: ``a < b`` in semver precedence iff ``key(a) < key(b)``."""
    if not isinstance(version, str):
        raise WorkflowDefinitionError(_not_a_string(version))
    rest, _, build = version.partition("+")
    core, dash, prerelease = rest.partition("-")
    parts = core.split(".")
    problem = (
        _core_problem(version, parts)
        or (_identifiers_problem(version, prerelease, "pre-release") if dash else None)
        or (_identifiers_problem(version, build, "build") if "+" in version else None)
    )
    if problem:
        raise WorkflowDefinitionError(problem)
    major, minor, patch = (_numeral(part) for part in parts)
    if not dash:
        return (major, minor, patch, (1, ()))
    return (major, minor, patch, (0, tuple(_identifier(i) for i in prerelease.split("."))))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` has lower, equal or higher precedence than ``b``."""
    key_a, key_b = version_key(a), version_key(b)
    return (key_a > key_b) - (key_a < key_b)


def latest(versions: Iterable[str]) -> str | None:
    """The version of highest precedence (None for none; the first one among equals).

    Pre-releases count: ``1.1.0-rc.1`` is later than ``1.0.0``.
    """
    best: str | None = None
    best_key: VersionKey | None = None
    for version in versions:
        key = version_key(version)
        if best_key is None or key > best_key:
            best, best_key = version, key
    return best


def _numeral(digits: str) -> Numeral:
    return (len(digits), digits)


def _identifier(text: str) -> Identifier:
    if set(text) <= _DIGITS:
        return (0, len(text), text)
    return (1, 0, text)


def _not_a_string(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return f"version must be a string such as '1.0.0', got {value!r}."
    if isinstance(value, (int, float)):
        return (
            f"version must be a string, got the number {value!r}: quote the version, e.g. "
            'version: "1.10.0" (YAML reads an unquoted 1.10 as the number 1.1).'
        )
    return f"version must be a string such as '1.0.0', got {type(value).__name__}."


def _core_problem(version: str, parts: list[str]) -> str | None:
    if version[:1] in ("v", "V") and len(version) > 1 and version[1].isdigit():
        return f"version {version!r} is not a semantic version: drop the leading {version[0]!r}."
    if not all(part and set(part) <= _DIGITS for part in parts):
        return (
            f"version {version!r} is not a semantic version: use MAJOR.MINOR.PATCH with an "
            "optional -prerelease, e.g. '1.0.0' or '2.1.0-rc.1'."
        )
    if len(parts) != 3:
        example = ".".join([*parts, "0", "0"][:3]) if len(parts) < 3 else "1.0.0"
        return (
            f"version {version!r} is not a semantic version: use MAJOR.MINOR.PATCH, "
            f"e.g. {example!r}."
        )
    zeros = [part for part in parts if len(part) > 1 and part[0] == "0"]
    if zeros:
        fixed = ".".join(part.lstrip("0") or "0" for part in parts)
        return (
            f"version {version!r} has a leading zero in {zeros[0]!r}, which semver forbids: "
            f"write {fixed!r}."
        )
    return None


def _identifiers_problem(version: str, text: str, what: str) -> str | None:
    for identifier in text.split("."):
        if not identifier or not set(identifier) <= _ALPHANUMERIC:
            return (
                f"version {version!r} has an invalid {what} part {text!r}: use dot-separated, "
                "non-empty identifiers of letters, digits and '-' (e.g. '1.0.0-rc.1')."
            )
        numeric_with_zero = set(identifier) <= _DIGITS and len(identifier) > 1
        if what == "pre-release" and numeric_with_zero and identifier[0] == "0":
            fixed = identifier.lstrip("0") or "0"
            return (
                f"version {version!r} has a leading zero in the pre-release identifier "
                f"{identifier!r}, which semver forbids: write {fixed!r} instead."
            )
    return None

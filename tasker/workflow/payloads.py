"""The payload rule: task contexts and step results are exact JSON documents, or refused.

Contexts and results are stored as jsonb, so one rule decides for both, before anything is
written: a value that would not read back equal is refused with :class:`PayloadError`, naming the
place inside the value and the fix.

Accepted: ``dict`` with ``str`` keys, ``list``, ``tuple`` (reads back as a ``list``), ``str``,
``bool``, ``None``, ``int`` within 64 bits, finite ``float``, and their subclasses (stored as the
base type: an ``IntEnum`` or an ``int`` subclass reads back as a plain ``int``, a ``str`` subclass
as a plain ``str``). jsonb stores numbers as ``numeric``, so a whole float from ``1e16`` up to 64
bits reads back as an equal ``int`` (``1e16`` as ``10000000000000000``), ``-0.0`` as ``0.0``, and
a float beyond 64 bits as the same ``float`` (Tasker's connections decode such numbers as floats,
see :func:`tasker.db.connection.load_json`).

Refused: non-``str`` keys, NaN and ±Infinity, NUL characters and lone surrogates (in keys too),
ints beyond 64 bits, whole floats between 2**53 and 2**63 whose shortest decimal form is not
exact (``2.0**60`` would read back as ``1152921504606847000``), nesting deeper than
:data:`MAX_NESTING`, values larger than the size limit, and every other type (``Decimal``,
``bytes``, ``set``, ``datetime``, dataclasses, ...), which a JSON encoder would otherwise turn
silently into something else.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import msgspec

from tasker.exceptions import PayloadError

__all__ = [
    "MAX_NESTING",
    "MAX_PAYLOAD_BYTES",
    "check_payload",
    "dump_json",
    "encode_json",
    "payload_problem",
]

#: Default size limit of a context or a result, in bytes of JSON (setting engine.max_payload_bytes).
MAX_PAYLOAD_BYTES = 1024 * 1024
#: Deepest nesting of lists and dicts accepted.
MAX_NESTING = 256
_INT64 = (-(2**63), 2**63 - 1)
#: Floats from this size up are whole numbers, which jsonb hands back as ints.
_WHOLE_FLOATS = 2.0**53
_MAX_PATH_CHARS = 160


def _base_value(value: Any) -> Any:
    """A ``str``, ``int`` or ``float`` subclass as its base type (msgspec encodes only exact
    types and enums; the payload rule has already accepted the value)."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


_encoder = msgspec.json.Encoder(enc_hook=_base_value)

_HINTS = {
    "Decimal": "convert it to str (exact) or float",
    "bytes": "decode it to str, or base64-encode it",
    "bytearray": "decode it to str, or base64-encode it",
    "set": "convert it to a list",
    "frozenset": "convert it to a list",
    "datetime": "convert it to an ISO 8601 string (.isoformat())",
    "date": "convert it to an ISO 8601 string (.isoformat())",
    "time": "convert it to an ISO 8601 string (.isoformat())",
    "timedelta": "convert it to a number of seconds",
    "UUID": "convert it to str",
}


def encode_json(
    value: Any,
    what: str,
    *,
    limit: int = MAX_PAYLOAD_BYTES,
    setting: str = "engine.max_payload_bytes",
) -> str:
    """JSON text of ``value`` if it passes the payload rule, else :class:`PayloadError` naming
    ``what`` (e.g. ``result``), the place inside the value and the fix (``setting``: what sets
    ``limit``)."""
    check_payload(value, what)
    return dump_json(value, what, limit=limit, setting=setting)


def check_payload(value: Any, what: str) -> None:
    """Raise :class:`PayloadError` if ``value`` would not read back equal from jsonb; the message
    starts with ``what`` and the place inside the value (``result["items"][3]: ...``)."""
    problem = payload_problem(value)
    if problem is not None:
        where, message = problem
        raise PayloadError(f"{what}{where}: {message}")


def payload_problem(value: Any) -> tuple[str, str] | None:
    """``(where, what is wrong)`` for the first place in ``value`` that breaks the rule, else
    None; ``where`` is a path such as ``["items"][3]`` (empty for ``value`` itself)."""
    problem = _problem(value, (), 0)
    if problem is None:
        return None
    path, message = problem
    return _path("", path), message


def dump_json(
    value: Any,
    what: str,
    *,
    limit: int = MAX_PAYLOAD_BYTES,
    setting: str = "engine.max_payload_bytes",
) -> str:
    """JSON text of a value already checked by :func:`check_payload`; :class:`PayloadError` when
    it is over ``limit`` bytes (the value's own JSON, not a document around it)."""
    try:
        data = _encoder.encode(value)
    except Exception as exc:  # the rule should have refused it already
        raise PayloadError(f"{what} is not JSON ({exc})") from None
    if len(data) > limit:
        raise PayloadError(
            f"{what} is {len(data):,} bytes of JSON, over the {limit:,}-byte limit "
            f"({setting}); store large data elsewhere and pass a reference."
        )
    return data.decode("utf-8")


Problem = tuple[tuple[Any, ...], str]


def _problem(value: Any, path: tuple[Any, ...], depth: int) -> Problem | None:
    """The first place in ``value`` that breaks the rule, and what is wrong there."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _text_problem(value, path)
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return None
        return path, "int beyond 64 bits, which jsonb cannot hold exactly; convert it to str"
    if isinstance(value, float):
        return _float_problem(float.__float__(value), path)
    if isinstance(value, (dict, list, tuple)):
        if depth >= MAX_NESTING:
            return path, f"nested more than {MAX_NESTING} levels deep; flatten it"
        if isinstance(value, dict):
            return _dict_problem(value, path, depth)
        for index, item in enumerate(value):
            found = _problem(item, (*path, index), depth + 1)
            if found:
                return found
        return None
    name = type(value).__name__
    hint = _HINTS.get(name, "convert it to a dict, list, str, int, float, bool or None")
    return path, f"{name} is not JSON; {hint}"


def _float_problem(value: float, path: tuple[Any, ...]) -> Problem | None:
    if not math.isfinite(value):
        return path, f"{value!r} is not JSON; use null or a string"
    if _WHOLE_FLOATS <= abs(value) <= _INT64[1]:
        stored = int(Decimal(repr(value)))  # the digits the JSON carries, read back as an int
        if stored != value:
            return (
                path,
                f"the float {value!r} is a whole number that jsonb would read back as the int "
                f"{stored}, which is not equal; pass int(value), or a str",
            )
    return None


def _dict_problem(value: dict[Any, Any], path: tuple[Any, ...], depth: int) -> Problem | None:
    for key, item in value.items():
        if not isinstance(key, str):
            return (
                (*path, _KeyOf(key)),
                f"key {_safe_repr(key)} is {_a(type(key).__name__)}; JSON keys are strings, so "
                "it would read back as a str: convert it to str",
            )
        found = _text_problem(key, (*path, key), what="key")
        found = found or _problem(item, (*path, key), depth + 1)
        if found:
            return found
    return None


def _text_problem(text: str, path: tuple[Any, ...], *, what: str = "text") -> Problem | None:
    if "\x00" in text:
        return path, f"the {what} contains a NUL character (\\u0000), which PostgreSQL rejects"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return path, f"the {what} contains a lone surrogate, which is not valid Unicode"
    return None


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


class _KeyOf:
    """Marks a non-str key in a path (shown as ``{key}``)."""

    def __init__(self, key: Any) -> None:
        self.key = key


def _path(what: str, path: tuple[Any, ...]) -> str:
    """``result["items"][3]["price"]``; a very long path keeps its start and end."""
    parts = [f"[{part}]" if isinstance(part, int) else f"[{_safe_repr(part)}]" for part in path]
    text = what + "".join(parts)
    if len(text) > _MAX_PATH_CHARS and len(parts) > 6:
        head = what + "".join(parts[:3])
        tail = "".join(parts[-3:])
        text = f"{head}...({len(parts) - 6} more)...{tail}"
    return text


def _safe_repr(part: Any) -> str:
    if isinstance(part, _KeyOf):
        return "{" + _safe_repr(part.key) + "}"
    if isinstance(part, str):
        shown = str.__str__(part)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        escaped = shown.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        return f'"{escaped}"'
    try:
        text = repr(part)
    except Exception:
        text = f"<{type(part).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."

"""Encode task contexts and step results for jsonb, refusing what jsonb would change or reject."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from tasker.exceptions import PayloadError

__all__ = ["MAX_NESTING", "MAX_PAYLOAD_BYTES", "encode_json"]

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_NESTING = 256
_encoder = msgspec.json.Encoder()


def encode_json(value: Any, what: str, *, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """JSON text of ``value``; raises :class:`PayloadError` naming ``what``, the place inside the
    value and the fix."""
    problem = _find_problem(value, what, 0)
    if problem:
        raise PayloadError(problem)
    try:
        data = _encoder.encode(value)
    except Exception as exc:
        raise PayloadError(
            f"{what} is not JSON-serialisable ({exc}); use dicts, lists, str, int, float, bool "
            "and None."
        ) from None
    if len(data) > limit:
        raise PayloadError(
            f"{what} is {len(data):,} bytes, over the {limit:,}-byte limit; store large data "
            "elsewhere and pass a reference."
        )
    return data.decode("utf-8")


def _find_problem(value: Any, where: str, depth: int) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} contains {value!r}, which JSON cannot store; use null or a string."
    if isinstance(value, str):
        return _text_problem(value, where)
    if depth >= MAX_NESTING and isinstance(value, (dict, list, tuple)):
        return f"{where} is nested more than {MAX_NESTING} levels deep; flatten it."
    if isinstance(value, dict):
        for key, item in value.items():
            inside = f"{where}[{_show(key)}]"
            found = _text_problem(key, f"{inside} (the key)") if isinstance(key, str) else None
            found = found or _find_problem(item, inside, depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_problem(item, f"{where}[{index}]", depth + 1)
            if found:
                return found
    return None


def _text_problem(text: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{where} contains a NUL character (\\u0000), which PostgreSQL rejects; remove it."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"{where} contains a lone surrogate, which is not valid Unicode and which PostgreSQL "
            "rejects; decode the text properly or remove it."
        )
    return None


def _show(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."

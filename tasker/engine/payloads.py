"""Encode task contexts and step results for jsonb, refusing what jsonb would change or reject."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from tasker.exceptions import PayloadError

__all__ = ["MAX_PAYLOAD_BYTES", "encode_json"]

MAX_PAYLOAD_BYTES = 1024 * 1024
_encoder = msgspec.json.Encoder()


def encode_json(value: Any, what: str, *, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """JSON text of ``value``; raises :class:`PayloadError` naming ``what`` and the fix."""
    problem = _find_problem(value, what)
    if problem:
        raise PayloadError(problem)
    try:
        data = _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
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


def _find_problem(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} contains {value!r}, which JSON cannot store; use null or a string."
    if isinstance(value, str) and "\x00" in value:
        return f"{where} contains a NUL character (\\u0000), which PostgreSQL rejects; remove it."
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_problem(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_problem(item, f"{where}[{index}]")
            if found:
                return found
    return None

"""What the ``tasker`` commands print with ``--json``: dataclass trees as plain JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

__all__ = ["jsonable", "print_json", "printable"]

#: Characters that reorder the text displayed around them (Unicode bidirectional controls).
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def jsonable(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, datetimes, scalars) as JSON-ready data: datetimes in ISO
    8601, other objects (UUIDs, ...) as their text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(jsonable(value), indent=2))


def printable(text: object) -> str:
    """``text`` safe to print in a table row: control characters (newlines, escape sequences,
    carriage returns) and bidirectional controls are shown escaped (``\\x1b``, ``\\u202e``), so
    stored text cannot forge rows or redraw the operator's terminal."""
    value = str(text)
    if value.isprintable() and not _BIDI_CONTROLS.intersection(value):
        return value
    return "".join(
        ch
        if ch.isprintable() and ch not in _BIDI_CONTROLS
        else ch.encode("unicode_escape").decode()
        for ch in value
    )

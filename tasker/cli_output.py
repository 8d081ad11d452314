"""What the ``tasker`` commands print with ``--json``: dataclass trees as plain JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

__all__ = ["jsonable", "print_json"]


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

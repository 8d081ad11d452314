"""Named SQL statements read from ``sql/queries/*.sql``.

A file holds blocks introduced by ``-- name: <name>``. Table identifiers are placeholders
(``{queue}``) filled with :mod:`psycopg.sql` identifiers; values are always bound parameters.
"""

from __future__ import annotations

import re
from functools import cache

from psycopg import sql

from tasker.resources import bundled_path

__all__ = ["load_queries", "render"]

_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def load_queries(group: str) -> dict[str, str]:
    """All named statements of ``sql/queries/<group>.sql`` by name."""
    text = (bundled_path("sql") / "queries" / f"{group}.sql").read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


def render(group: str, name: str, **identifiers: sql.Composable) -> str:
    """The statement ``name`` of ``group`` with its ``{placeholders}`` filled, as text."""
    template = sql.SQL(load_queries(group)[name])
    return template.format(**identifiers).as_string(None)

"""The engine's named statements (``sql/queries/engine.sql``, ``sql/queries/coordinator.sql``)."""

from __future__ import annotations

from typing import Any

from tasker.db.queries import load_queries, render

__all__ = ["cq", "q", "render_cq"]


def q(name: str) -> str:
    """The engine statement ``name``."""
    return load_queries("engine")[name]


def cq(name: str) -> str:
    """The coordinator statement ``name`` (``sql/queries/coordinator.sql``)."""
    return load_queries("coordinator")[name]


def render_cq(name: str, **identifiers: Any) -> str:
    """The coordinator statement ``name`` with its ``{placeholders}`` filled."""
    return render("coordinator", name, **identifiers)

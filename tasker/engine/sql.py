"""The engine's named statements (``sql/queries/engine.sql``)."""

from __future__ import annotations

from tasker.db.queries import load_queries

__all__ = ["q"]


def q(name: str) -> str:
    """The engine statement ``name``."""
    return load_queries("engine")[name]

"""Turn database settings into a URL, starting the embedded server where that is allowed."""

from __future__ import annotations

from typing import Protocol

from tasker.db.embedded import embedded_url
from tasker.exceptions import ConfigurationError

__all__ = ["DatabaseLocation", "resolve_database_url"]


class DatabaseLocation(Protocol):
    """Where the database is, as this module reads it (``tasker.settings.DatabaseSettings`` is
    one): declared here so the db layer does not import the settings above it."""

    @property
    def url(self) -> str:
        """A PostgreSQL URL; empty for none."""
        ...

    @property
    def allow_embedded(self) -> bool:
        """Whether the embedded PostgreSQL may stand in when no URL is set."""
        ...

    @property
    def embedded_dir(self) -> str:
        """The embedded PostgreSQL's data directory."""
        ...


def resolve_database_url(database: DatabaseLocation, *, keep_embedded_running: bool = False) -> str:
    """The configured URL, or the embedded PostgreSQL's when no URL is set and it is allowed."""
    if database.url:
        return database.url
    if not database.allow_embedded:
        raise ConfigurationError(
            "No database configured: set TASKER_DATABASE__URL (or database.url in "
            "settings/settings.toml) to a PostgreSQL URL."
        )
    return embedded_url(database.embedded_dir, keep_running=keep_embedded_running)

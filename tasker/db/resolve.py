"""Turn database settings into a URL, starting the embedded server where that is allowed."""

from __future__ import annotations

from tasker.db.embedded import embedded_url
from tasker.exceptions import ConfigurationError
from tasker.settings import DatabaseSettings

__all__ = ["resolve_database_url"]


def resolve_database_url(database: DatabaseSettings, *, keep_embedded_running: bool = False) -> str:
    """The configured URL, or the embedded PostgreSQL's when no URL is set and it is allowed."""
    if database.url:
        return database.url
    if not database.allow_embedded:
        raise ConfigurationError(
            "No database configured: set TASKER_DATABASE__URL (or database.url in "
            "settings/settings.toml) to a PostgreSQL URL."
        )
    return embedded_url(database.embedded_dir, keep_running=keep_embedded_running)

"""Locate the files Tasker ships next to its code: SQL migrations, named queries, settings.

In a wheel they live under ``tasker/_bundled``; in a source checkout (editable install) they are
the top-level ``sql/`` and ``settings/`` folders of the repository.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tasker.exceptions import ConfigurationError

__all__ = ["bundled_path"]

_PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def bundled_path(name: str) -> Path:
    """Return the directory ``name`` (``"sql"`` or ``"settings"``) shipped with Tasker."""
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(
        f"Tasker's {name!r} folder is missing from the installation ({_PACKAGE_DIR}); "
        "reinstall the package (pip install --force-reinstall tasker)."
    )

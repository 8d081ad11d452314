"""Start sentry-sdk from the settings, in a worker process or a coordinator (the edge).

With ``sentry.dsn`` empty nothing happens and sentry-sdk is not even imported: it is an optional
dependency (``pip install 'tasker[sentry]'``). With a DSN, :func:`init_sentry` initialises it
with its Dramatiq integration, which reports what actors raise (the orchestration stages,
a step actor's own trouble), and the default ones (logged errors among them). It must run before
the broker is built: the Dramatiq integration adds its middleware in ``Broker.__init__``.
Step failures, which never reach Dramatiq, are reported by
:class:`tasker.middleware.sentry.SentryStepFailures`.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from tasker.exceptions import ConfigurationError
from tasker.settings import Settings, mask_dsn

__all__ = ["import_sentry_sdk", "init_sentry"]

logger = logging.getLogger(__name__)


def import_sentry_sdk() -> ModuleType:
    """The ``sentry_sdk`` module; a :class:`ConfigurationError` saying how to install it when
    it is missing (only call this when ``sentry.dsn`` is set)."""
    try:
        import sentry_sdk
    except ImportError:
        raise ConfigurationError(
            "sentry.dsn is set but sentry-sdk is not installed: pip install 'tasker[sentry]' "
            "(or unset TASKER_SENTRY__DSN to run without Sentry)"
        ) from None
    return sentry_sdk


def init_sentry(settings: Settings, *, component: str, transport: Any = None) -> bool:
    """Initialise sentry-sdk for this process when ``sentry.dsn`` is set; returns whether it did.

    ``component`` (``worker``, ``coordinator``) becomes the ``tasker.component`` tag of every
    event. ``transport`` replaces sentry-sdk's HTTP transport (tests).
    """
    config = settings.sentry
    if not config.dsn:
        return False
    sentry_sdk = import_sentry_sdk()
    from sentry_sdk.integrations.dramatiq import DramatiqIntegration

    environment = config.environment or settings.env
    sentry_sdk.init(
        dsn=config.dsn,
        environment=environment,
        release=config.release or None,
        traces_sample_rate=config.traces_sample_rate or None,
        integrations=[DramatiqIntegration()],
        transport=transport,
    )
    sentry_sdk.get_global_scope().set_tag("tasker.component", component)
    logger.info(
        "Reporting errors to Sentry at %s (environment %s)", mask_dsn(config.dsn), environment
    )
    return True

"""The broker module for Dramatiq's CLI: ``dramatiq tasker.actors myapp.flows``.

Importing this module is the one place where Tasker reads its settings at import time, because that
is how Dramatiq's CLI finds a broker: it builds a :class:`~tasker.brokers.pgmq.PGMQBroker` from
``settings/settings.toml`` and ``TASKER_*`` variables (``TASKER_ENV`` picks the environment), makes
it Dramatiq's global broker, declares the orchestration actors, and turns every workflow step
defined in the modules imported after it into an actor. No connection is opened until the worker
starts. ``tasker worker myapp.flows`` runs the same thing. With ``sentry.dsn`` set, sentry-sdk is
initialised first (its Dramatiq integration must see the broker being built).
"""

from __future__ import annotations

import dramatiq

from tasker.runtime.broker import broker_from_settings
from tasker.runtime.sentry import init_sentry
from tasker.runtime.workflows import install_from_settings
from tasker.settings import load_settings

__all__ = ["broker"]

_settings = load_settings()
init_sentry(_settings, component="worker")
broker = broker_from_settings(_settings)
dramatiq.set_broker(broker)
install_from_settings(broker, _settings)

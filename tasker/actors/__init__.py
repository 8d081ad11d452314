"""The broker module for Dramatiq's CLI: ``dramatiq tasker.actors myapp.tasks``.

Importing this module is the one place where Tasker reads its settings at import time, because that
is how Dramatiq's CLI finds a broker: it builds a :class:`~tasker.brokers.pgmq.PGMQBroker` from
``settings/settings.toml`` and ``TASKER_*`` variables (``TASKER_ENV`` picks the environment) and
makes it Dramatiq's global broker. No connection is opened until the worker starts. Application
code should import its own actor modules, not this one; ``tasker worker myapp.tasks`` runs it.
"""

from __future__ import annotations

import dramatiq

from tasker.actors.setup import broker_from_settings

__all__ = ["broker"]

broker = broker_from_settings()
dramatiq.set_broker(broker)

"""Dramatiq middleware of Tasker's workers: cross-cutting concerns, each in its own module.

* :mod:`tasker.middleware.finalization`: run finalization actors under the task's atomic claim;
* :mod:`tasker.middleware.metrics`: count messages, steps and tasks (Prometheus);
* :mod:`tasker.middleware.templates`: register the process's workflow templates at worker boot;
* :mod:`tasker.middleware.sentry`: report step failures to Sentry (only with ``sentry.dsn``).
"""

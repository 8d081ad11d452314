"""Circuit breakers: the database breaker of each worker process, and step breakers shared by
every worker through PostgreSQL (decision 0010, docs/operations.md "Circuit breakers").

* :mod:`tasker.breakers.policy`: the rule, pure (a rolling window of failures, an open window,
  half-open trials);
* :mod:`tasker.breakers.database`: the per-process database breaker (consumers stop claiming
  while PostgreSQL is unreachable);
* :mod:`tasker.breakers.shared`: the step breakers (``@flow.step(breaker="payments")``);
* :mod:`tasker.breakers.registry`: the states this process sees, and listeners of their changes
  (:func:`add_listener`, :func:`states`).
"""

from __future__ import annotations

from tasker.breakers.policy import BreakerPolicy, BreakerState
from tasker.breakers.registry import add_listener, remove_listener, states

__all__ = ["BreakerPolicy", "BreakerState", "add_listener", "remove_listener", "states"]

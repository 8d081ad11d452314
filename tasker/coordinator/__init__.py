"""The coordinator: one leader (a PostgreSQL advisory lock) among any number of replicas runs,
every cycle, the recovery sweep, staleness detection, retention and the scaling hints.

``tasker coordinator`` runs it as a process (with ``/metrics`` and health endpoints); with
``coordinator.in_worker = true`` every worker process runs one in a thread instead, for
one-machine set-ups. See docs/operations.md.
"""

from tasker.coordinator.loop import Coordinator, CycleReport

__all__ = ["Coordinator", "CycleReport"]

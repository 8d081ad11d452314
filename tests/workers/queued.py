"""A workflow and a plain actor in one module, for `tasker queues create` (tests/test_cli.py)."""

from __future__ import annotations

import dramatiq

import tasker

flow = tasker.Workflow("queued", "one_step", version="1.0.0")


@flow.step()
def only(ctx: tasker.StepContext) -> int:
    return 1


@dramatiq.actor(queue_name="queued_plain")
def plain() -> None:
    """A plain Dramatiq actor next to the workflow."""

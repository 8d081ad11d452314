"""A workflow whose steps end in every state, for the metrics tests (`tasker worker
tests.workers.metered`, or in-process).

``metered/mixed``: ``begin -> flaky -> end``. ``flaky`` fails its first attempt (retried at once)
when the task context says ``"flaky": true``, and fails for good (``PermanentError``, so the task
ends ``blocked_by_failures``) when it says ``"fail": true``.
"""

from __future__ import annotations

from typing import Any

import tasker

flow = tasker.Workflow("metered", "mixed", version="1.0.0")


@flow.step()
def begin(ctx: tasker.StepContext) -> dict[str, Any]:
    return {"began": True}


@flow.step(depends_on=["begin"], max_attempts=3)
def flaky(ctx: tasker.StepContext) -> dict[str, Any]:
    if ctx.task_context.get("fail"):
        raise tasker.PermanentError("refused for the test")
    if ctx.task_context.get("flaky") and ctx.attempt == 1:
        raise tasker.RetryableError("the first attempt fails", retry_after=0)
    return {"attempt": ctx.attempt}


@flow.step(depends_on=["flaky"])
def end(ctx: tasker.StepContext) -> dict[str, Any]:
    return {"ended": True}

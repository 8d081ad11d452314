"""The shape of a definition: what may not change without a new version.

Tasks are created from the template stored for ``(namespace, name, version)``. When a worker
registers a definition under a version that is already stored, the engine compares
:func:`definition_shape` of both: a difference means the definition changed without a version
bump.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasker.workflow.backoff import BackoffPolicy
from tasker.workflow.definition import Workflow

__all__ = ["definition_shape", "shape_differences"]


def definition_shape(
    template: Mapping[str, Any], *, environment: str | None = None
) -> dict[str, Any]:
    """What must not change within one version of a definition, as a comparable dict.

    ``template`` is a task template (``Workflow.to_template()`` output as stored, or a seed-format
    template, resolved for ``environment`` as :meth:`Workflow.from_template` does; handlers are
    not imported). The shape holds, with every default filled in so that an omitted default and
    the same value written out compare equal:

    - ``steps``: per step name, its ``dependencies`` (sorted: the edges), ``retryable``,
      ``max_attempts``, ``timeout_seconds`` (None without one), ``inputs`` (the handler's
      ``initialization``), ``breaker`` (None without one) and ``backoff``, the policy the step
      retries with (its own, else the workflow's) in seconds: ``base_seconds``, ``multiplier``,
      ``max_seconds``, ``jitter``;
    - ``backoff``: the workflow's policy, in the same form;
    - ``identity_strategy``;
    - ``input_schema`` (None without one).

    Not in it: ``description``, ``metadata``, the handler's callable path (moving a function to
    another module changes no task's behaviour), the order in which steps are listed, and the
    key (namespace, name, version) itself.
    """
    flow = Workflow.from_template(
        template, resolve_handlers=False, register=False, environment=environment
    )
    return {
        "steps": {
            step.name: {
                "dependencies": sorted(step.depends_on),
                "retryable": step.retryable,
                "max_attempts": step.max_attempts,
                "timeout_seconds": step.timeout,
                "inputs": dict(step.inputs),
                "breaker": step.breaker,
                "backoff": _policy(flow.step_policy(step.name)),
            }
            for step in flow.steps.values()
        },
        "backoff": _policy(flow.backoff),
        "identity_strategy": flow.identity_strategy,
        "input_schema": flow.input_schema,
    }


def _policy(policy: BackoffPolicy) -> dict[str, float]:
    return {
        "base_seconds": policy.base_seconds,
        "multiplier": policy.multiplier,
        "max_seconds": policy.max_seconds,
        "jitter": policy.jitter,
    }


def shape_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`definition_shape` results, one short phrase per change,
    naming the step and the field (``"step 'charge': max_attempts 3 -> 5"``); empty when
    nothing does."""
    changes: list[str] = []
    old_steps, new_steps = old.get("steps", {}), new.get("steps", {})
    for name in sorted(old_steps.keys() - new_steps.keys()):
        changes.append(f"step {name!r} removed")
    for name in sorted(new_steps.keys() - old_steps.keys()):
        changes.append(f"step {name!r} added")
    for name in sorted(old_steps.keys() & new_steps.keys()):
        changes += _changed(f"step {name!r}: ", old_steps[name], new_steps[name])
    for key in sorted((old.keys() | new.keys()) - {"steps"}):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict) and key == "backoff":
            changes += _changed("workflow backoff ", old[key], new[key])
        elif old.get(key) != new.get(key):
            changes.append(f"{key} {_brief(old.get(key))} -> {_brief(new.get(key))}")
    return changes


def _changed(prefix: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changes = []
    for field in sorted(old.keys() | new.keys()):
        before, after = old.get(field), new.get(field)
        if before == after:
            continue
        if field == "backoff" and isinstance(before, dict) and isinstance(after, dict):
            changes += _changed(f"{prefix}backoff ", before, after)
        else:
            changes.append(f"{prefix}{field} {_brief(before)} -> {_brief(after)}")
    return changes


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

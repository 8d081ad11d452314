"""The strict schema of task templates (the seed's YAML format) and their ``environments``.

A template is validated, never coerced: a value of the wrong type, a field Tasker does not know
(a typo), a step type or a feature Tasker does not implement is refused with a
:class:`~tasker.exceptions.WorkflowDefinitionError` naming the file, the step and the field::

    order.yaml: step 'charge': retry.max_attempts must be an integer, got 2.9.
    order.yaml: step 'charge': retyr is not a known field; did you mean 'retry'?

Fields that change nothing in Tasker (``lifecycle.staleness_action``, ``system_dependencies``,
``system_dependency``) are accepted with a :class:`~tasker.exceptions.TemplateWarning`;
``description`` and ``metadata`` are accepted silently. docs/workflows.md ("Templates") lists
every field. :func:`check_template` validates a template and resolves it for one environment;
:class:`~tasker.workflow.definition.Workflow` builds the workflow from the result.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from tasker.exceptions import WorkflowDefinitionError
from tasker.workflow.backoff import MAX_BACKOFF_S
from tasker.workflow.input_schema import check_input_schema
from tasker.workflow.payloads import payload_problem
from tasker.workflow.versions import check_version

__all__ = [
    "ALL_STEPS",
    "BACKOFF_FIELDS",
    "COMMON_ENVIRONMENTS",
    "DEFAULT_ENVIRONMENT",
    "IDENTITY_STRATEGIES",
    "MAX_ATTEMPTS",
    "MAX_TIMEOUT_S",
    "CheckedTemplate",
    "check_json_mapping",
    "check_lifecycle",
    "check_stored_text",
    "check_template",
    "current_environment",
    "read_template_file",
    "resolve_environment",
]

#: The identity strategies a template may name (seed-spec §1.3).
IDENTITY_STRATEGIES = ("strict", "caller_provided", "always_unique")
#: The longest step timeout accepted, in seconds (30 days).
MAX_TIMEOUT_S = 30 * 24 * 3600.0
#: The most attempts a step may have.
MAX_ATTEMPTS = 1000
#: The step name that makes an environment override apply to every step.
ALL_STEPS = "ALL"
#: The environment used when neither the caller nor ``TASKER_ENV`` names one.
DEFAULT_ENVIRONMENT = "development"
#: Environment names Tasker's settings know; an override named close to one is likely a typo.
COMMON_ENVIRONMENTS = ("development", "test", "staging", "production")
#: The retry fields that give a step its own backoff policy.
BACKOFF_FIELDS = ("backoff_base_ms", "backoff_multiplier", "max_backoff_ms", "jitter")


class _FieldError(Exception):
    """A value breaks its field's rule: ``text`` follows the field's name (``at`` goes between)."""

    def __init__(self, text: str, at: str = "") -> None:
        super().__init__(text)
        self.text, self.at = text, at


Check = Callable[[Any], None]


@dataclass(frozen=True)
class _Field:
    """One field of a mapping in the schema."""

    check: Check | None = None
    required: bool = False
    fields: Mapping[str, _Field] | None = None  # a nested mapping with these fields
    refused: str | None = None  # present at all: refused, for this reason
    warned: str | None = None  # accepted, with a warning that ends with this text


@dataclass
class _Scope:
    """Where in which template a check is: the messages start with it."""

    source: str
    part: str | None = None
    notes: list[str] = field(default_factory=list)

    def within(self, part: str) -> _Scope:
        return _Scope(self.source, part, self.notes)

    def message(self, path: str, text: str) -> str:
        """``source: part: path text`` (without ``path``: ``source: part text``)."""
        head = ": ".join(p for p in (self.source, self.part) if p)
        text = f"{head}: {path} {text}" if path else f"{head} {text}"
        return text if text.endswith((".", "?")) else text + "."

    def prefixed(self, text: str) -> str:
        """``text`` (a message that names its field) after ``source: part:``."""
        return ": ".join(p for p in (self.source, self.part, text) if p)

    def fail(self, path: str, text: str) -> NoReturn:
        raise WorkflowDefinitionError(self.message(path, text))


# -- value checks: each raises _FieldError with the text that follows the field's name ----------


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        return f"the list {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, (datetime, date, time)):
        return f"a {type(value).__name__} ({value}; quote it in YAML to make it a string)"
    if value is None:
        return "null (nothing)"
    if isinstance(value, (str, int, float)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


def _string(value: Any) -> None:
    if not isinstance(value, str):
        raise _FieldError(f"must be a string, got {_show(value)}")


def _nonempty_string(value: Any) -> None:
    _string(value)
    if not value.strip():
        raise _FieldError("must not be empty")


def _boolean(value: Any) -> None:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false (unquoted), got {_show(value)}")


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(f"must be an integer, got {_show(value)}")
        if not low <= value <= high:
            raise _FieldError(f"must be an integer from {low} to {high}, got {value}")

    return check


def _number(
    low: float, high: float = math.inf, *, above: bool = False, below: bool = False
) -> Check:
    """A finite int or float in [low, high]; ``above``/``below`` exclude ``low``/``high``."""
    lower = f"above {low:.15g}" if above else f"at least {low:.15g}"
    upper = "" if high == math.inf else f" and {'below' if below else 'at most'} {high:.15g}"

    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _FieldError(f"must be a number, got {_show(value)}")
        too_low = value <= low if above else value < low
        too_high = value >= high if below else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise _FieldError(f"must be a number {lower}{upper}, got {value!r}")

    return check


def _choice(
    choices: tuple[str, ...], refused: Mapping[str, str] | None = None, *, other: str = ""
) -> Check:
    """One of ``choices``; a value in ``refused`` (or any other, with ``other``) is refused with
    its reason."""

    def check(value: Any) -> None:
        _string(value)
        if value in choices:
            return
        reason = (refused or {}).get(value, other)
        if reason:
            raise _FieldError(f"{value!r} is not supported: {reason}")
        allowed = ", ".join(map(repr, choices))
        known = [*choices, *(refused or {})]
        raise _FieldError(f"must be one of {allowed}, got {value!r}{_did_you_mean(value, known)}")

    return check


def _names(value: Any) -> None:
    """A list of step names (a string is not a list: 'ab' is not ['a', 'b'])."""
    if isinstance(value, str):
        raise _FieldError(f"must be a list of step names, got {value!r}; write [{value!r}] for one")
    if not isinstance(value, (list, tuple)):
        raise _FieldError(f"must be a list of step names, got {_show(value)}")
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise _FieldError(f"must list step names, got {_show(name)}", at=f"[{index}]")
    twice = sorted({name for name in value if value.count(name) > 1})
    if twice:
        raise _FieldError(f"lists {twice[0]!r} more than once")


def _version(value: Any) -> None:
    check_version(value)  # its message names the field and the fix


def _strings(value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _FieldError(f"must be a list of strings, got {_show(value)}")


def _refused_unless_empty(reason: str) -> Check:
    def check(value: Any) -> None:
        if value != []:
            raise _FieldError(f"is not supported: {reason}")

    return check


def _json(value: Any) -> None:
    """Refuse what jsonb would not store and read back equal: the payload rule of contexts and
    results (non-str keys, NaN, NUL characters, ints beyond 64 bits, dates, other objects)."""
    problem = payload_problem(value)
    if problem is not None:
        at, text = problem
        if text.startswith(("datetime ", "date ", "time ")):
            text += "; in YAML, quote it to make it a string"
        raise _FieldError(f"must be JSON: {text}", at)


def _json_mapping(value: Any) -> None:
    if not isinstance(value, Mapping):
        raise _FieldError(f"must be a mapping, got {_show(value)}")
    _json(value)


def check_json_mapping(value: object, what: str) -> None:
    """Refuse ``value`` unless it is a mapping of JSON values (``what`` names it)."""
    try:
        _json_mapping(value)
    except _FieldError as problem:
        raise WorkflowDefinitionError(f"{what}{problem.at} {problem.text}.") from None


def check_stored_text(value: object, what: str) -> None:
    """Refuse a string PostgreSQL cannot store (a NUL character, a lone surrogate), or any other
    part of a template (``value``, named ``what``) that breaks the payload rule."""
    problem = payload_problem(value)
    if problem is not None:
        raise WorkflowDefinitionError(f"{what}{problem[0]}: {problem[1]}.")


def _storable(value: Any, scope: _Scope, path: str = "") -> None:
    """Fail on the first string (or value) of ``value`` PostgreSQL would not store as given."""
    problem = payload_problem(value)
    if problem is not None:
        at = re.sub(r'\["([^"\\]*)"\]', r".\1", problem[0]).lstrip(".")
        scope.fail(_join(path, at) if at else path, f"cannot be stored: {problem[1]}")


def _did_you_mean(word: object, known: list[str]) -> str:
    close = difflib.get_close_matches(str(word), known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- the schema ----------------------------------------------------------------------------------

_BACKOFF_NUMBERS: Mapping[str, _Field] = {
    "backoff_base_ms": _Field(_number(0, MAX_BACKOFF_S * 1000)),
    "backoff_multiplier": _Field(_number(1)),
    "max_backoff_ms": _Field(_number(0, MAX_BACKOFF_S * 1000)),
    "jitter": _Field(_number(0, 1, below=True)),
}
_EXPONENTIAL = (
    "Tasker's backoff is exponential (backoff_base_ms x backoff_multiplier^attempts, capped at "
    "max_backoff_ms)"
)
_RETRY: Mapping[str, _Field] = {
    "retryable": _Field(_boolean),
    "max_attempts": _Field(_integer(1, MAX_ATTEMPTS)),
    "backoff": _Field(
        _choice(
            ("exponential",),
            {
                "none": f"{_EXPONENTIAL}; for retries without delay write backoff_base_ms: 0",
                "linear": f"{_EXPONENTIAL}; write backoff: exponential",
                "fibonacci": f"{_EXPONENTIAL}; write backoff: exponential",
            },
        )
    ),
    **_BACKOFF_NUMBERS,
}
_TIMEOUT = _Field(_number(0, MAX_TIMEOUT_S, above=True))
_HANDLER: Mapping[str, _Field] = {
    "callable": _Field(_nonempty_string, required=True),
    "method": _Field(
        _choice(
            ("call",),
            other="Tasker calls the function handler.callable names, with the StepContext; "
            "point callable at the function to run ('module:function') and remove method",
        )
    ),
    "resolver": _Field(
        refused="Tasker imports handler.callable ('module:function') itself; remove resolver"
    ),
    "initialization": _Field(_json_mapping),
}
_NO_DECISIONS = (
    "Tasker has no decision points or deferred convergence and would run every branch; make "
    "the choice inside a standard step, or use one workflow per branch"
)
_NO_BATCHES = "Tasker has no batch processing; split the work in a standard step"
_STEP_TYPES = _choice(
    ("standard",),
    {
        "decision": _NO_DECISIONS,
        "deferred_convergence": _NO_DECISIONS,
        "batchable": _NO_BATCHES,
        "batch_worker": _NO_BATCHES,
    },
)
_NO_EFFECT = "is accepted but changes nothing in Tasker"
_STEP: Mapping[str, _Field] = {
    "name": _Field(_string, required=True),
    "description": _Field(_string),
    "handler": _Field(required=True, fields=_HANDLER),
    "type": _Field(_STEP_TYPES),
    "step_type": _Field(_STEP_TYPES),
    "system_dependency": _Field(_string, warned=_NO_EFFECT),
    "dependencies": _Field(_names),
    "retry": _Field(fields=_RETRY),
    "timeout_seconds": _TIMEOUT,
    "breaker": _Field(_nonempty_string),
    "publishes_events": _Field(
        _refused_unless_empty("Tasker publishes no domain events; remove publishes_events")
    ),
    "batch_config": _Field(refused=_NO_BATCHES),
}
_LIFECYCLE: Mapping[str, _Field] = {
    "max_duration_minutes": _Field(_integer(1, 43200)),
    "max_waiting_for_dependencies_minutes": _Field(_integer(1, 10080)),
    "max_blocked_by_failures_minutes": _Field(_integer(1, 43200)),
    "max_waiting_for_retry_minutes": _Field(_integer(1, 10080)),
    "max_steps_in_process_minutes": _Field(_integer(1, 10080)),
    "staleness_action": _Field(
        _choice(("dlq", "error", "none")),
        warned="is not applied: a stale task always goes to the task DLQ and to error",
    ),
    "auto_fail_on_timeout": _Field(_boolean, warned=_NO_EFFECT),
    "auto_dlq_on_timeout": _Field(_boolean, warned=_NO_EFFECT),
}
_TASK_HANDLER = "Tasker has no task-level handler; put the work in a step and remove task_handler"
_TEMPLATE: Mapping[str, _Field] = {
    "name": _Field(_string, required=True),
    "namespace_name": _Field(_string, required=True),
    "version": _Field(_version, required=True),
    "description": _Field(_string),
    "metadata": _Field(_json_mapping),
    "identity_strategy": _Field(_choice(IDENTITY_STRATEGIES)),
    "backoff": _Field(fields=_BACKOFF_NUMBERS),
    "input_schema": _Field(_json_mapping),
    "steps": _Field(required=True),  # checked step by step by _check_steps
    "environments": _Field(),  # checked by _check_environments
    "task_handler": _Field(refused=_TASK_HANDLER),
    "domain_events": _Field(
        _refused_unless_empty("Tasker publishes no domain events; remove domain_events")
    ),
    "lifecycle": _Field(fields=_LIFECYCLE),  # staleness limits, applied by the coordinator
    "system_dependencies": _Field(
        fields={"primary": _Field(_string), "secondary": _Field(_strings)}, warned=_NO_EFFECT
    ),
}
_STEP_OVERRIDE: Mapping[str, _Field] = {
    "name": _Field(_string, required=True),
    "handler": _Field(fields={"initialization": _Field(_json_mapping)}),
    "timeout_seconds": _TIMEOUT,
    "retry": _Field(fields=_RETRY),
}
_ENVIRONMENT: Mapping[str, _Field] = {
    "steps": _Field(),  # checked override by override
    "task_handler": _Field(refused=_TASK_HANDLER),
}


def check_lifecycle(value: object, where: str) -> tuple[str, ...]:
    """Check ``value`` as a template's ``lifecycle`` mapping; returns the warnings to issue.

    The rule is the template schema's: the staleness limits are whole minutes in range, a field
    Tasker does not know is refused (with the likely field it meant), and the fields that change
    nothing (``staleness_action``...) come back as warnings. ``where`` starts every message.
    Raises :class:`~tasker.exceptions.WorkflowDefinitionError`.
    """
    scope = _Scope(where)
    _check_mapping(value, _LIFECYCLE, scope, "lifecycle")
    return tuple(scope.notes)


def _check_mapping(value: Any, fields: Mapping[str, _Field], scope: _Scope, path: str) -> None:
    if not isinstance(value, Mapping):
        scope.fail(path, f"must be a mapping, got {_show(value)}")
    for key in value:
        if key not in fields:
            hint = _did_you_mean(key, list(fields)) or f"; the fields here are {', '.join(fields)}"
            scope.fail(_join(path, str(key)), f"is not a known field{hint}")
    for key, spec in fields.items():
        if key in value:
            _check_field(value[key], spec, scope, _join(path, key))
        elif spec.required:
            scope.fail(_join(path, key), "is required")


def _check_field(value: Any, spec: _Field, scope: _Scope, path: str) -> None:
    if spec.refused:
        scope.fail(path, f"is not supported: {spec.refused}")
    if spec.fields is not None:
        _check_mapping(value, spec.fields, scope, path)
    elif spec.check is not None:
        try:
            spec.check(value)
        except _FieldError as problem:
            scope.fail(path + problem.at, problem.text)
        except WorkflowDefinitionError as exc:  # a version: its message names the field
            raise WorkflowDefinitionError(scope.prefixed(str(exc))) from None
    if spec.warned:
        scope.notes.append(scope.message(path, spec.warned))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _list_of_mappings(
    value: Any, scope: _Scope, path: str, prefix: str = ""
) -> list[Mapping[str, Any]]:
    if not isinstance(value, (list, tuple)):
        scope.fail(path, f"must be a list, got {_show(value)}")
    for index, item in enumerate(value, 1):
        if not isinstance(item, Mapping):
            scope.within(f"{prefix}step #{index}").fail(
                "", f"must be a mapping with a name, got {_show(item)}"
            )
    return list(value)


def _scope_of(item: Mapping[str, Any], index: int, scope: _Scope, prefix: str = "") -> _Scope:
    name = item.get("name")
    return scope.within(prefix + (f"step {name!r}" if isinstance(name, str) else f"step #{index}"))


def _check_steps(value: Any, scope: _Scope) -> list[str]:
    steps = _list_of_mappings(value, scope, "steps")
    if not steps:
        scope.fail("steps", "must list at least one step")
    for index, step in enumerate(steps, 1):
        step_scope = _scope_of(step, index, scope)
        _check_mapping(step, _STEP, step_scope, "")
        if "type" in step and "step_type" in step:
            step_scope.fail("step_type", "repeats type (its alias): keep one of them")
    names: list[str] = []
    for step in steps:
        if step["name"] in names:
            scope.within(f"step {step['name']!r}").fail(
                "", "is declared twice; step names must be unique"
            )
        names.append(step["name"])
    for step in steps:
        for parent in step.get("dependencies", ()):
            if parent not in names:
                scope.within(f"step {step['name']!r}").fail(
                    "dependencies",
                    f"names {parent!r}, which is not a step of this template"
                    f"{_did_you_mean(parent, names)}",
                )
    return names


def _check_environments(value: Any, names: list[str], scope: _Scope) -> None:
    if not isinstance(value, Mapping):
        scope.fail("environments", f"must be a mapping of environment names, got {_show(value)}")
    for environment, overrides in value.items():
        if not isinstance(environment, str) or not environment:
            scope.fail("environments", f"has the key {environment!r}: use environment names")
        if environment != environment.strip().lower():
            lower = environment.strip().lower()
            scope.fail(
                f"environments.{environment}",
                "is not a lower-case environment name, and environments are read in lower "
                f"case (TASKER_ENV=PRODUCTION is production): write {lower!r}",
            )
        where = f"environments.{environment}"
        _check_mapping(overrides, _ENVIRONMENT, scope, where)
        seen: set[str] = set()
        for index, override in enumerate(
            _list_of_mappings(overrides.get("steps", []), scope, f"{where}.steps", f"{where}: "), 1
        ):
            step_scope = _scope_of(override, index, scope, f"{where}: ")
            _check_mapping(override, _STEP_OVERRIDE, step_scope, "")
            name = override["name"]
            if name != ALL_STEPS and name not in names:
                step_scope.fail(
                    "",
                    f"is not a step of this template (name {ALL_STEPS} applies to every step)"
                    f"{_did_you_mean(name, names)}",
                )
            if name in seen:
                step_scope.fail("", f"is overridden twice in {where}; merge the two overrides")
            seen.add(name)


# -- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedTemplate:
    """A template that passed the schema, resolved for ``environment``.

    ``notes`` are the warnings to issue (as :class:`~tasker.exceptions.TemplateWarning`) once
    the workflow is built.
    """

    template: Mapping[str, Any]
    environment: str
    notes: tuple[str, ...] = ()


def current_environment(environment: str | None = None) -> str:
    """``environment``, else ``TASKER_ENV``, else ``"development"``; stripped and in lower
    case, as the settings read ``TASKER_ENV`` (``PRODUCTION`` is ``production`` for both)."""
    if environment is None:
        return (os.environ.get("TASKER_ENV") or DEFAULT_ENVIRONMENT).strip().lower()
    if not isinstance(environment, str) or not environment.strip():
        raise WorkflowDefinitionError(
            f"environment must be a non-empty string such as 'production', got {environment!r}."
        )
    return environment.strip().lower()


def check_template(
    raw: object, *, environment: str | None = None, source: str = "task template"
) -> CheckedTemplate:
    """Validate ``raw`` against the schema and apply ``environments.<environment>``.

    Every environment's overrides are validated, not only the one applied. ``source`` (the file
    name) starts every message. Cycles, step-name rules and handler imports are checked when
    the workflow is built.
    """
    scope = _Scope(source)
    if not isinstance(raw, Mapping):
        scope.fail(
            "", f"must be a mapping (name, namespace_name, version, steps), got {_show(raw)}"
        )
    _check_mapping(raw, _TEMPLATE, scope, "")
    if "input_schema" in raw:
        check_input_schema(raw["input_schema"], where=scope.prefixed("input_schema"))
    names = _check_steps(raw["steps"], scope)
    _check_environments(raw.get("environments", {}), names, scope)
    # last, the strings no field checks (a NUL character in a description, a name, a callable)
    _storable({key: raw[key] for key in raw if key not in ("steps", "environments")}, scope)
    for index, step in enumerate(raw["steps"], 1):
        _storable(step, _scope_of(step, index, scope))
    _storable(raw.get("environments", {}), scope, "environments")
    chosen = current_environment(environment)
    named_by = "TASKER_ENV" if environment is None else "the environment argument"
    _note_unmatched_environments(raw.get("environments", {}), chosen, named_by, scope)
    return CheckedTemplate(resolve_environment(raw, chosen), chosen, tuple(scope.notes))


def _note_unmatched_environments(
    environments: Mapping[str, Any], chosen: str, named_by: str, scope: _Scope
) -> None:
    """Warn about an override that can never apply because of a typo, and about an environment
    that matches no override when a close one exists (``prod`` vs ``production``)."""
    for name in environments:
        if name not in COMMON_ENVIRONMENTS and name != chosen:
            hint = _did_you_mean(name, list(COMMON_ENVIRONMENTS))
            if hint:
                scope.notes.append(
                    scope.message(
                        f"environments.{name}",
                        f"applies only when the environment is {name!r}{hint}",
                    )
                )
    if environments and chosen not in environments:
        prefixed = [name for name in environments if name.startswith(chosen) and chosen]
        hint = f"; did you mean {prefixed[0]!r}?" if prefixed else ""
        hint = hint or _did_you_mean(chosen, list(environments))
        if hint:
            scope.notes.append(
                scope.message(
                    "environments",
                    f"has no overrides for the current environment {chosen!r} ({named_by}), so "
                    f"none are applied{hint}",
                )
            )


def resolve_environment(template: Mapping[str, Any], environment: str) -> dict[str, Any]:
    """``template`` (already checked) with ``environments.<environment>`` applied, without
    ``environments``.

    An override named ``ALL`` applies to every step first, then the override named after the
    step. Per field: ``handler.initialization`` keys are merged into the step's (the override
    wins), ``timeout_seconds`` is replaced, and each ``retry`` field given replaces the step's
    (the others stay).
    """
    resolved = {key: value for key, value in template.items() if key != "environments"}
    overrides = template.get("environments", {}).get(environment) or {}
    by_name = {override["name"]: override for override in overrides.get("steps", [])}
    everywhere = by_name.pop(ALL_STEPS, None)
    steps = []
    for original in template["steps"]:
        step = original
        for override in (everywhere, by_name.get(step["name"])):
            if override is not None:
                step = _apply(step, override)
        steps.append(step)
    resolved["steps"] = steps
    return resolved


def _apply(step: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(step)
    initialization = override.get("handler", {}).get("initialization")
    if initialization is not None:
        handler = dict(step["handler"])
        handler["initialization"] = {**handler.get("initialization", {}), **initialization}
        merged["handler"] = handler
    if "timeout_seconds" in override:
        merged["timeout_seconds"] = override["timeout_seconds"]
    if "retry" in override:
        merged["retry"] = {**step.get("retry", {}), **override["retry"]}
    return merged


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema, refusing a key given twice in a mapping.

    PyYAML implements YAML 1.1, which reads plain scalars in ways a template author rarely means:
    ``yes``/``no``/``on``/``off`` as booleans (``country: NO`` is false), ``0755`` as octal,
    ``1_000`` as 1000, ``1:30`` as 90 and ``2024-01-01`` as a date. Under the core schema only
    ``true``/``True``/``TRUE`` and ``false``/``False``/``FALSE`` are booleans,
    ``~``/``null``/``Null``/``NULL``/nothing is null, numbers are decimal (or
    ``0o``/``0x``), and everything else is a string. PyYAML keeps the last of duplicate keys;
    this loader refuses them.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} is given twice in one mapping; keep one",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
        if digits[:2] == "0o":
            return sign * int(digits[2:], 8)
        if digits[:2] == "0x":
            return sign * int(digits[2:], 16)
        return sign * int(digits)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node)).lower()
        if text.lstrip("+-") == ".inf":
            return -math.inf if text[0] == "-" else math.inf
        if text == ".nan":
            return math.nan
        return float(text)


# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_StrictLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", "~nN"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("merge", r"^(?:<<)$", "<"),
):
    _StrictLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}",
        re.compile(_pattern),
        [*_first, ""] if _tag == "null" else list(_first),
    )
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def read_template_file(path: str | Path) -> Any:
    """The YAML document in ``path`` (a key given twice in a mapping is an error)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowDefinitionError(f"Cannot read task template {path}: {exc}") from exc
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise WorkflowDefinitionError(f"{path}: {where}{problem}.") from exc
    except yaml.YAMLError as exc:
        raise WorkflowDefinitionError(f"{path}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    _check_expanded_size(data, str(path))
    return data


#: The most values (mappings, lists and scalars) a template may hold once its YAML aliases are
#: expanded: real templates hold a few thousand; "billion laughs" documents hold billions.
MAX_TEMPLATE_VALUES = 200_000


def _check_expanded_size(data: Any, source: str) -> None:
    """Refuse a document whose aliases expand it beyond :data:`MAX_TEMPLATE_VALUES` values, or
    make a structure contain itself (an alias inside its own anchor); counted without expanding
    (each shared mapping or list once)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        children = list(node.values()) if isinstance(node, Mapping) else node
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[id(node)] > MAX_TEMPLATE_VALUES:
                raise WorkflowDefinitionError(
                    f"{source}: the document expands to more than {MAX_TEMPLATE_VALUES:,} values "
                    "through its YAML aliases (*name); write the repeated parts out, or use fewer "
                    "aliases."
                )
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if not isinstance(child, (Mapping, list)) or id(child) in sizes:
                continue
            if id(child) in open_nodes:
                raise WorkflowDefinitionError(
                    f"{source}: a YAML alias (*name) refers to the anchor (&name) it is inside "
                    "of, so the document contains itself; remove that alias."
                )
            stack.append((child, False))

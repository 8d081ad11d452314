"""Workflow definitions: steps, dependencies, retry settings, and their template form.

A :class:`Workflow` is a DAG of named steps. It is written with decorators::

    flow = Workflow("fulfillment", "process_order", version="1.0.0")

    @flow.step()
    def validate_order(ctx: StepContext) -> dict: ...

    @flow.step(depends_on=["validate_order"], max_attempts=3)
    def reserve_inventory(ctx: StepContext) -> dict: ...

or loaded from a YAML task template in the seed's format (handlers named ``module:function``),
checked by the strict schema of :mod:`tasker.workflow.templates`. Definitions are validated
(types, unknown fields, dependencies, cycles, names, semantic versions) before anything is
written; nothing is coerced.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tasker.exceptions import TemplateWarning, WorkflowDefinitionError
from tasker.workflow.backoff import BackoffPolicy
from tasker.workflow.input_schema import check_input_schema
from tasker.workflow.templates import (
    BACKOFF_FIELDS,
    IDENTITY_STRATEGIES,
    MAX_ATTEMPTS,
    MAX_TIMEOUT_S,
    check_json_mapping,
    check_lifecycle,
    check_stored_text,
    check_template,
    read_template_file,
)
from tasker.workflow.versions import check_version

__all__ = [
    "DEFAULT_IDENTITY_STRATEGY",
    "IDENTITY_STRATEGIES",
    "MAX_ATTEMPTS",
    "MAX_TIMEOUT_S",
    "PermanentError",
    "RetryableError",
    "StepContext",
    "StepDefinition",
    "Workflow",
    "WorkflowDefinitionError",
    "legacy_step_actor_name",
    "registered_workflows",
    "step_actor_name",
]

#: Every submit creates a new task unless it carries an idempotency key (decision 0006); a
#: template may choose ``strict`` (one task per context) or ``caller_provided`` (a key required).
DEFAULT_IDENTITY_STRATEGY = "always_unique"


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")

Handler = Callable[["StepContext"], Any]
F = TypeVar("F", bound=Callable[..., Any])


class RetryableError(Exception):
    """Raise from a step to fail this attempt and retry it.

    ``retry_after`` (seconds, capped by the backoff policy's maximum) wins over the computed
    backoff; a value that is not a finite number of 0 seconds or more (negative, NaN, infinite,
    not a number) is ignored and the computed backoff applies."""

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Raise from a step to fail it for good: no retry, dependents never run."""


@dataclass(frozen=True)
class StepContext:
    """What a step handler receives.

    ``deadline`` is when the step's ``timeout`` runs out (UTC; None without a timeout). Dramatiq
    cannot interrupt blocking calls in C code, so long sync handlers should check
    :meth:`time_left` between units of work and stop in time (docs/workflows.md).
    """

    task_uuid: str
    step_uuid: str
    step_name: str
    namespace: str
    workflow: str
    task_context: Mapping[str, Any]
    parent_results: Mapping[str, Any]
    inputs: Mapping[str, Any]
    attempt: int
    max_attempts: int
    correlation_id: str
    deadline: datetime | None = None

    def time_left(self) -> float | None:
        """Seconds until ``deadline`` (0.0 once passed), or None when the step has no timeout."""
        if self.deadline is None:
            return None
        return max((self.deadline - datetime.now(UTC)).total_seconds(), 0.0)

    @property
    def idempotency_key(self) -> str:
        """Stable for this step across attempts: use it to make side effects happen once."""
        return f"tasker:{self.step_uuid}"

    @property
    def is_retry(self) -> bool:
        return self.attempt > 1

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


@dataclass(frozen=True)
class StepDefinition:
    """One step of a workflow."""

    name: str
    handler_path: str
    depends_on: tuple[str, ...] = ()
    max_attempts: int = 3
    retryable: bool = True
    timeout: float | None = None
    backoff: BackoffPolicy | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    handler: Handler | None = field(default=None, compare=False, repr=False)
    breaker: str | None = None

    def to_template(self) -> dict[str, Any]:
        """This step in the template format (``retry`` holds its own backoff, if it has one)."""
        retry: dict[str, Any] = {"retryable": self.retryable, "max_attempts": self.max_attempts}
        if self.backoff is not None:
            retry.update(backoff="exponential", **_backoff_fields(self.backoff))
        step: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "handler": {"callable": self.handler_path, "initialization": dict(self.inputs)},
            "dependencies": list(self.depends_on),
            "retry": retry,
        }
        if self.timeout is not None:
            step["timeout_seconds"] = self.timeout
        if self.breaker is not None:
            step["breaker"] = self.breaker
        return step


class Workflow:
    """A named, versioned DAG of steps in a namespace.

    ``version`` is a semantic version (:mod:`tasker.workflow.versions`). ``input_schema`` is a
    JSON Schema for task contexts (checked here, enforced by the engine at submit);
    ``metadata`` is free-form JSON kept in the template.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        version: str = "0.1.0",
        *,
        description: str = "",
        identity_strategy: str = DEFAULT_IDENTITY_STRATEGY,
        backoff: BackoffPolicy | None = None,
        input_schema: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        lifecycle: Mapping[str, Any] | None = None,
        register: bool = True,
    ) -> None:
        # Names and the version are kept as plain ``str``: a str Enum member would otherwise
        # print as ``Kind.A`` in actor names, templates and log lines.
        self.namespace = _check_name("namespace", namespace)
        self.name = _check_name("workflow name", name)
        self.version = check_version(version)
        _check_workflow_settings(description, identity_strategy, backoff, input_schema, metadata)
        self.description = description
        self.identity_strategy = identity_strategy
        self.backoff = backoff if backoff is not None else BackoffPolicy()
        self.input_schema: Mapping[str, Any] | None = copy.deepcopy(input_schema)
        self.metadata: Mapping[str, Any] = copy.deepcopy(dict(metadata or {}))
        self.lifecycle: Mapping[str, Any] = _check_lifecycle(lifecycle, repr(self))
        self.steps: dict[str, StepDefinition] = {}
        if register:
            _register(self)

    def __repr__(self) -> str:
        return f"Workflow({self.namespace!r}, {self.name!r}, version={self.version!r})"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.name, self.version)

    @property
    def queue_name(self) -> str:
        """The Dramatiq queue of this namespace's steps."""
        return f"worker_{self.namespace}_queue"

    def actor_name(self, step: str) -> str:
        """The Dramatiq actor that runs ``step`` of this version."""
        return step_actor_name(self.namespace, self.name, self.version, step)

    def step(
        self,
        name: str | None = None,
        *,
        depends_on: Iterable[str] = (),
        max_attempts: int = 3,
        retryable: bool = True,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        inputs: Mapping[str, Any] | None = None,
        breaker: str | None = None,
    ) -> Callable[[F], F]:
        """Declare the decorated function as a step (sync or ``async def``).

        ``breaker`` names a circuit breaker shared by every worker (``"payments"``): after
        repeated failures of the steps that name it, their messages wait, without using an
        attempt, until it closes again (docs/operations.md, "Circuit breakers").
        """

        parents = _step_names(depends_on, f"depends_on of step {name!r}" if name else "depends_on")
        if inputs is not None:
            check_json_mapping(inputs, f"inputs of step {name!r}" if name else "inputs")

        def decorate(fn: F) -> F:
            self.add_step(
                StepDefinition(
                    name=fn.__name__ if name is None else name,
                    handler_path=f"{fn.__module__}:{fn.__qualname__}",
                    depends_on=parents,
                    max_attempts=max_attempts,
                    retryable=retryable,
                    timeout=timeout,
                    backoff=backoff,
                    inputs=dict(inputs) if inputs is not None else {},
                    description=(inspect.getdoc(fn) or "").split("\n")[0],
                    handler=fn,
                    breaker=breaker,
                )
            )
            return fn

        return decorate

    def add_step(self, step: StepDefinition) -> None:
        """Add a step; dependencies must already be declared (so the DAG stays acyclic)."""
        step = replace(
            step,
            name=_check_name("step name", step.name),
            depends_on=_step_names(step.depends_on, f"depends_on of step {step.name!r}"),
        )
        if step.name in self.steps:
            raise WorkflowDefinitionError(f"{self!r} already has a step named {step.name!r}.")
        _check_step_settings(step)
        missing = [d for d in step.depends_on if d not in self.steps]
        if missing:
            raise WorkflowDefinitionError(
                f"Step {step.name!r} depends on {missing}, which {self!r} does not define "
                "(yet): declare dependencies before the steps that need them."
            )
        self.steps[step.name] = step
        if _WORKFLOWS.get(self.key) is self:
            for listener in list(_LISTENERS):
                listener(self, step)

    def validate(self) -> None:
        """Check the whole definition: at least one step, known dependencies, no cycle."""
        if not self.steps:
            raise WorkflowDefinitionError(f"{self!r} has no steps.")
        _check_acyclic({s.name: s.depends_on for s in self.steps.values()}, repr(self))

    def step_policy(self, step: str) -> BackoffPolicy:
        """The backoff policy of ``step``: its own, else the workflow's."""
        return self.steps[step].backoff or self.backoff

    def to_template(self) -> dict[str, Any]:
        """The task template (seed format) stored in the database for clients and the API.

        It is the definition as resolved for the environment it was loaded in (no
        ``environments``), and it loads back (:meth:`from_template`) to an equal definition.
        """
        self.validate()
        template: dict[str, Any] = {
            "name": self.name,
            "namespace_name": self.namespace,
            "version": self.version,
            "description": self.description,
            "identity_strategy": self.identity_strategy,
            "backoff": _backoff_fields(self.backoff),
            "steps": [s.to_template() for s in self.steps.values()],
        }
        if self.input_schema is not None:
            template["input_schema"] = copy.deepcopy(self.input_schema)
        if self.metadata:
            template["metadata"] = copy.deepcopy(self.metadata)
        if self.lifecycle:
            template["lifecycle"] = dict(self.lifecycle)
        return template

    @classmethod
    def from_template(
        cls,
        template: Mapping[str, Any],
        *,
        resolve_handlers: bool = True,
        register: bool = True,
        environment: str | None = None,
    ) -> Workflow:
        """Build a workflow from a template mapping, checked by the strict template schema.

        ``resolve_handlers`` imports the handlers. ``environment`` picks the ``environments``
        overrides to apply (default: ``TASKER_ENV``, else ``"development"``). Fields accepted
        without effect are reported with a :class:`~tasker.exceptions.TemplateWarning`.
        """
        return _load(
            cls,
            template,
            source="task template",
            resolve=resolve_handlers,
            register=register,
            environment=environment,
        )

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        *,
        resolve_handlers: bool = True,
        register: bool = True,
        environment: str | None = None,
    ) -> Workflow:
        """Load a YAML task template (seed format) whose handlers are ``module:function``.

        As :meth:`from_template`; every message names the file.
        """
        return _load(
            cls,
            read_template_file(path),
            source=str(path),
            resolve=resolve_handlers,
            register=register,
            environment=environment,
        )


#: The staleness limits a workflow may set (minutes), applied by the coordinator.
LIFECYCLE_LIMITS = (
    "max_duration_minutes",
    "max_waiting_for_dependencies_minutes",
    "max_blocked_by_failures_minutes",
    "max_waiting_for_retry_minutes",
    "max_steps_in_process_minutes",
)


def _check_lifecycle(lifecycle: object, where: str) -> dict[str, Any]:
    """The staleness limits of ``lifecycle``, checked by the template schema's rule
    (:func:`~tasker.workflow.templates.check_lifecycle`); the fields that change nothing
    (``staleness_action``...) are dropped after their :class:`TemplateWarning`."""
    if lifecycle is None:
        return {}
    for note in check_lifecycle(lifecycle, where):
        warnings.warn(note, TemplateWarning, stacklevel=3)
    assert isinstance(lifecycle, Mapping)  # check_lifecycle refused anything else
    return _limits(lifecycle)


def step_actor_name(namespace: str, workflow: str, version: str, step: str) -> str:
    """The Dramatiq actor of one step of one workflow version:
    ``tasker.<namespace>.<workflow>@<version>.<step>``, so that a worker that loads two versions
    runs each version's own handler."""
    return f"tasker.{namespace}.{workflow}@{version}.{step}"


def legacy_step_actor_name(namespace: str, workflow: str, step: str) -> str:
    """The unversioned actor name that step messages carried before versions were part of it:
    ``tasker.<namespace>.<workflow>.<step>`` (workers still accept them, see
    :mod:`tasker.runtime.workflows`)."""
    return f"tasker.{namespace}.{workflow}.{step}"


def _check_workflow_settings(
    description: object,
    identity_strategy: object,
    backoff: object,
    input_schema: object,
    metadata: object,
) -> None:
    if not isinstance(description, str):
        raise WorkflowDefinitionError(f"description must be a string, got {description!r}.")
    check_stored_text(description, "description")
    if identity_strategy not in IDENTITY_STRATEGIES:
        raise WorkflowDefinitionError(
            f"identity_strategy {identity_strategy!r} is unknown; use one of "
            f"{', '.join(IDENTITY_STRATEGIES)}."
        )
    if backoff is not None and not isinstance(backoff, BackoffPolicy):
        raise WorkflowDefinitionError(
            f"backoff must be a tasker.BackoffPolicy, got {type(backoff).__name__}."
        )
    if input_schema is not None:
        check_json_mapping(input_schema, "input_schema")
        check_input_schema(input_schema)
    if metadata is not None:
        check_json_mapping(metadata, "metadata")


def _load(
    cls: type[Workflow],
    raw: object,
    *,
    source: str,
    resolve: bool,
    register: bool,
    environment: str | None,
) -> Workflow:
    checked = check_template(raw, environment=environment, source=source)
    try:
        flow = _build(cls, checked.template, resolve)
    except WorkflowDefinitionError as exc:
        raise WorkflowDefinitionError(f"{source}: {exc}") from exc.__cause__
    for note in checked.notes:
        warnings.warn(note, TemplateWarning, stacklevel=3)
    if register:
        _register(flow)
    return flow


def _build(cls: type[Workflow], template: Mapping[str, Any], resolve: bool) -> Workflow:
    """The workflow of a template that passed the schema (types and fields are known good)."""
    flow = cls(
        template["namespace_name"],
        template["name"],
        template["version"],
        description=template.get("description", ""),
        identity_strategy=template.get("identity_strategy", DEFAULT_IDENTITY_STRATEGY),
        backoff=_policy(template.get("backoff", {}), BackoffPolicy()),
        input_schema=template.get("input_schema"),
        metadata=template.get("metadata"),
        # the template's own check warned about the fields that change nothing
        lifecycle=_limits(template.get("lifecycle", {})),
        register=False,
    )
    steps = {raw["name"]: raw for raw in template["steps"]}
    order = _check_acyclic(
        {name: tuple(raw.get("dependencies", ())) for name, raw in steps.items()}, "task template"
    )
    for name in order:
        flow.add_step(_step_from_template(steps[name], resolve, flow.backoff))
    flow.validate()
    return flow


def _limits(lifecycle: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in lifecycle.items() if key in LIFECYCLE_LIMITS}


def _check_step_settings(step: StepDefinition) -> None:
    where = f"Step {step.name!r}"
    _check_attempts(where, step.max_attempts)
    if not isinstance(step.retryable, bool):
        raise WorkflowDefinitionError(
            f"{where}: retryable must be True or False, got {step.retryable!r}."
        )
    _check_timeout(where, step.timeout)
    _step_names(step.depends_on, f"depends_on of step {step.name!r}")
    if not isinstance(step.handler_path, str) or not step.handler_path:
        raise WorkflowDefinitionError(
            f"{where}: handler_path must name the handler as 'module:function', got "
            f"{step.handler_path!r}."
        )
    if step.backoff is not None and not isinstance(step.backoff, BackoffPolicy):
        raise WorkflowDefinitionError(
            f"{where}: backoff must be a tasker.BackoffPolicy or None, got "
            f"{type(step.backoff).__name__}."
        )
    check_json_mapping(step.inputs, f"{where}: inputs")
    if not isinstance(step.description, str):
        raise WorkflowDefinitionError(
            f"{where}: description must be a string, got {step.description!r}."
        )
    check_stored_text(step.description, f"{where}: description")
    check_stored_text(step.handler_path, f"{where}: handler_path")
    _check_breaker(where, step.breaker)
    if step.handler is not None:
        _check_handler(step.name, step.handler)


#: The name of the process's database breaker, not available to steps.
_RESERVED_BREAKER = "database"


def breaker_name_problem(breaker: object) -> str | None:
    """What is wrong with ``breaker`` as a step breaker's name (None: nothing): 1-64 lower-case
    letters, digits or underscores, starting with a letter, and not ``database``."""
    if not isinstance(breaker, str) or not _NAME.match(breaker):
        return (
            f"breaker {breaker!r} is invalid: name it with 1-64 lower-case letters, digits or "
            "underscores, starting with a letter (for example 'payments')"
        )
    if breaker == _RESERVED_BREAKER:
        return (
            "breaker 'database' is the name of the workers' own database breaker, which lives "
            "in each worker process's memory and closes by itself when its probe succeeds"
        )
    return None


def _check_breaker(where: str, breaker: object) -> None:
    if breaker is None:
        return
    problem = breaker_name_problem(breaker)
    if problem is not None:
        raise WorkflowDefinitionError(
            f"{where}: {problem}; name the service the step calls (for example 'payments')."
        )


def _check_attempts(where: str, attempts: object) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise WorkflowDefinitionError(
            f"{where}: max_attempts must be a whole number, got {attempts!r}."
        )
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise WorkflowDefinitionError(
            f"{where}: max_attempts must be between 1 and {MAX_ATTEMPTS}, got {attempts}."
        )


def _check_timeout(where: str, timeout: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout <= MAX_TIMEOUT_S  # NaN fails this too
    ):
        raise WorkflowDefinitionError(
            f"{where}: timeout must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_S:.0f} (30 days), got {timeout!r}."
        )


def _step_names(value: Any, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of step names; a plain string is refused (it is not a list)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise WorkflowDefinitionError(
            f"{what} must be a list of step names, got {value!r}; write [{value!r}] for one."
        )
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise WorkflowDefinitionError(f"{what} must list step names, got {name!r}.")
    names = tuple(str.__str__(name) for name in names)  # see check_version
    for name in names:
        if names.count(name) > 1:
            raise WorkflowDefinitionError(f"{what} lists {name!r} more than once.")
    return names


def _check_handler(name: str, handler: Any) -> None:
    if not callable(handler):
        raise WorkflowDefinitionError(f"Step {name!r}: its handler {handler!r} is not callable.")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    try:
        signature.bind(None)
    except TypeError:
        raise WorkflowDefinitionError(
            f"Step {name!r}: its handler must take one argument, the StepContext "
            f"(def {getattr(handler, '__name__', 'handler')}(ctx): ...), but its signature is "
            f"{signature}."
        ) from None


def _check_name(what: str, value: object) -> str:
    """``value`` as a plain ``str`` (see :func:`check_version`) if it is a valid name."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise WorkflowDefinitionError(
            f"{what.capitalize()} {value!r} is invalid: use 1-64 lower-case letters, digits or "
            "underscores, starting with a letter."
        )
    return str.__str__(value)


def _policy(raw: Mapping[str, Any], base: BackoffPolicy) -> BackoffPolicy:
    """The policy ``raw`` (template fields in ms) describes; fields it omits come from ``base``."""
    return BackoffPolicy(
        base_seconds=raw["backoff_base_ms"] / 1000
        if "backoff_base_ms" in raw
        else base.base_seconds,
        multiplier=raw.get("backoff_multiplier", base.multiplier),
        max_seconds=raw["max_backoff_ms"] / 1000 if "max_backoff_ms" in raw else base.max_seconds,
        jitter=raw.get("jitter", base.jitter),
    )


def _ms(seconds: float) -> int | float:
    """``seconds`` in milliseconds: a whole number when that reads back exactly."""
    whole = round(seconds * 1000)
    return whole if whole / 1000 == seconds else seconds * 1000


def _backoff_fields(policy: BackoffPolicy) -> dict[str, Any]:
    return {
        "backoff_base_ms": _ms(policy.base_seconds),
        "backoff_multiplier": policy.multiplier,
        "max_backoff_ms": _ms(policy.max_seconds),
        "jitter": policy.jitter,
    }


def _step_from_template(
    raw: Mapping[str, Any], resolve: bool, workflow_backoff: BackoffPolicy
) -> StepDefinition:
    """The step of a template step that passed the schema."""
    handler = raw["handler"]
    retry = raw.get("retry", {})
    try:
        function = resolve_handler(handler["callable"]) if resolve else None
    except WorkflowDefinitionError as exc:
        raise WorkflowDefinitionError(f"step {raw['name']!r}: {exc}") from exc.__cause__
    return StepDefinition(
        name=raw["name"],
        handler_path=handler["callable"],
        depends_on=tuple(raw.get("dependencies", ())),
        max_attempts=retry.get("max_attempts", 3),
        retryable=retry.get("retryable", True),
        timeout=raw.get("timeout_seconds"),
        backoff=_policy(retry, workflow_backoff) if retry.keys() & set(BACKOFF_FIELDS) else None,
        inputs=dict(handler.get("initialization", {})),
        description=raw.get("description", ""),
        handler=function,
        breaker=raw.get("breaker"),
    )


def resolve_handler(path: str) -> Handler:
    """Import the handler named ``module:function`` (or ``module.function``)."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise WorkflowDefinitionError(
            f"Handler {path!r} is not a 'module:function' path (for example 'shop.steps:charge')."
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise WorkflowDefinitionError(f"Cannot import handler {path!r}: {exc}") from exc
    if not callable(target):
        raise WorkflowDefinitionError(f"Handler {path!r} is not callable.")
    handler: Handler = target
    return handler


def _check_acyclic(graph: Mapping[str, tuple[str, ...]], owner: str) -> list[str]:
    """Kahn's algorithm: the steps in dependency order, or an error naming the cycle."""
    remaining = {name: set(deps) for name, deps in graph.items()}
    order: list[str] = []
    ready = sorted(n for n, deps in remaining.items() if not deps)
    while ready:
        name = ready.pop(0)
        order.append(name)
        for other, deps in remaining.items():
            if name in deps:
                deps.discard(name)
                if not deps and other not in order and other not in ready:
                    ready.append(other)
    if len(order) != len(graph):
        cycle = sorted(set(graph) - set(order))
        raise WorkflowDefinitionError(
            f"{owner} has a dependency cycle among steps {cycle}; remove one of the dependencies."
        )
    return order


# -- the process-wide registry of workflows (pure: no database) ---------------------------------

_WORKFLOWS: dict[tuple[str, str, str], Workflow] = {}
_LISTENERS: list[Callable[[Workflow, StepDefinition], None]] = []


_ORIGINS: dict[tuple[str, str, str], tuple[str, int]] = {}
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _origin() -> tuple[str, int]:
    """The file and line of the code outside this package that is defining a workflow."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


def _register(flow: Workflow) -> None:
    """Make ``flow`` the process's definition of its key.

    The same code running again (a module reloaded, a notebook cell run twice) replaces the
    earlier definition, and so does an identical complete one (one YAML file loaded in two
    places). Another definition of the same version elsewhere is refused: the workers would bind
    the step actors of whichever ran last.
    """
    origin = _origin()
    earlier = _WORKFLOWS.get(flow.key)
    elsewhere = earlier is not None and earlier is not flow and _ORIGINS[flow.key] != origin
    if elsewhere and not _same_definition(earlier, flow):
        where = "{}:{}".format(*_ORIGINS[flow.key])
        raise WorkflowDefinitionError(
            f"{flow!r} is already defined in this process (at {where}); a version names one "
            "definition: give this one another version (or name), or build it with "
            "register=False if it is not meant for the workers."
        )
    _WORKFLOWS[flow.key] = flow
    _ORIGINS[flow.key] = origin
    for step in flow.steps.values():
        for listener in list(_LISTENERS):
            listener(flow, step)


def _same_definition(one: Workflow | None, other: Workflow) -> bool:
    """Both complete, with equal templates (a definition still being declared is never equal)."""
    if one is None or not one.steps or not other.steps:
        return False
    try:
        return one.to_template() == other.to_template()
    except WorkflowDefinitionError:
        return False


def registered_workflows() -> list[Workflow]:
    """Every workflow defined in this process."""
    return list(_WORKFLOWS.values())


def on_step_declared(listener: Callable[[Workflow, StepDefinition], None]) -> None:
    """Call ``listener(flow, step)`` for every step declared now and later (used to bind actors)."""
    _LISTENERS.append(listener)
    for flow in list(_WORKFLOWS.values()):
        for step in flow.steps.values():
            listener(flow, step)

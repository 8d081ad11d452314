"""Workflow definitions: steps, dependencies, retry settings, and their template form.

A :class:`Workflow` is a DAG of named steps. It is written with decorators::

    flow = Workflow("fulfillment", "process_order", version="1.0.0")

    @flow.step()
    def validate_order(ctx: StepContext) -> dict: ...

    @flow.step(depends_on=["validate_order"], max_attempts=3)
    def reserve_inventory(ctx: StepContext) -> dict: ...

or loaded from a YAML task template in the seed's format (handlers named ``module:function``).
Definitions are validated (unknown dependencies, cycles, bad names) before anything is written.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tasker.exceptions import WorkflowDefinitionError
from tasker.workflow.backoff import BackoffPolicy

__all__ = [
    "IDENTITY_STRATEGIES",
    "PermanentError",
    "RetryableError",
    "StepContext",
    "StepDefinition",
    "Workflow",
    "WorkflowDefinitionError",
    "registered_workflows",
]

IDENTITY_STRATEGIES = ("strict", "caller_provided", "always_unique")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,16}$")

Handler = Callable[["StepContext"], Any]
F = TypeVar("F", bound=Callable[..., Any])


class RetryableError(Exception):
    """Raise from a step to fail this attempt and retry it (``retry_after`` seconds wins over
    the computed backoff)."""

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

    def to_template(self) -> dict[str, Any]:
        retry: dict[str, Any] = {"retryable": self.retryable, "max_attempts": self.max_attempts}
        if self.backoff is not None:
            retry.update(
                backoff="exponential",
                backoff_base_ms=int(self.backoff.base_seconds * 1000),
                backoff_multiplier=self.backoff.multiplier,
                max_backoff_ms=int(self.backoff.max_seconds * 1000),
                jitter=self.backoff.jitter,
            )
        step: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "handler": {"callable": self.handler_path, "initialization": dict(self.inputs)},
            "dependencies": list(self.depends_on),
            "retry": retry,
        }
        if self.timeout is not None:
            step["timeout_seconds"] = self.timeout
        return step


class Workflow:
    """A named, versioned DAG of steps in a namespace."""

    def __init__(
        self,
        namespace: str,
        name: str,
        version: str = "0.1.0",
        *,
        description: str = "",
        identity_strategy: str = "strict",
        backoff: BackoffPolicy | None = None,
        register: bool = True,
    ) -> None:
        _check_name("namespace", namespace)
        _check_name("workflow name", name)
        if not _VERSION.match(version):
            raise WorkflowDefinitionError(
                f"Version {version!r} is invalid: use up to 16 characters of letters, digits, "
                "'.', '+' or '-' (for example '1.0.0')."
            )
        if identity_strategy not in IDENTITY_STRATEGIES:
            raise WorkflowDefinitionError(
                f"identity_strategy {identity_strategy!r} is unknown; use one of "
                f"{', '.join(IDENTITY_STRATEGIES)}."
            )
        self.namespace = namespace
        self.name = name
        self.version = version
        self.description = description
        self.identity_strategy = identity_strategy
        self.backoff = backoff or BackoffPolicy()
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
        """The Dramatiq actor that runs ``step``."""
        return f"tasker.{self.namespace}.{self.name}.{step}"

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
    ) -> Callable[[F], F]:
        """Declare the decorated function as a step (sync or ``async def``)."""

        parents = _step_names(depends_on, f"depends_on of step {name!r}" if name else "depends_on")

        def decorate(fn: F) -> F:
            self.add_step(
                StepDefinition(
                    name=name or fn.__name__,
                    handler_path=f"{fn.__module__}:{fn.__qualname__}",
                    depends_on=parents,
                    max_attempts=max_attempts,
                    retryable=retryable,
                    timeout=timeout,
                    backoff=backoff,
                    inputs=dict(inputs or {}),
                    description=(inspect.getdoc(fn) or "").split("\n")[0],
                    handler=fn,
                )
            )
            return fn

        return decorate

    def add_step(self, step: StepDefinition) -> None:
        """Add a step; dependencies must already be declared (so the DAG stays acyclic)."""
        _check_name("step name", step.name)
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
        return self.steps[step].backoff or self.backoff

    def to_template(self) -> dict[str, Any]:
        """The task template (seed format) stored in the database for clients and the API."""
        self.validate()
        return {
            "name": self.name,
            "namespace_name": self.namespace,
            "version": self.version,
            "description": self.description,
            "identity_strategy": self.identity_strategy,
            "backoff": {
                "backoff_base_ms": int(self.backoff.base_seconds * 1000),
                "backoff_multiplier": self.backoff.multiplier,
                "max_backoff_ms": int(self.backoff.max_seconds * 1000),
                "jitter": self.backoff.jitter,
            },
            "steps": [s.to_template() for s in self.steps.values()],
        }

    @classmethod
    def from_template(
        cls, template: Mapping[str, Any], *, resolve_handlers: bool = True, register: bool = True
    ) -> Workflow:
        """Build a workflow from a template mapping (``resolve_handlers`` imports the handlers)."""
        try:
            flow = cls(
                template["namespace_name"],
                template["name"],
                str(template.get("version", "0.1.0")),
                description=template.get("description", ""),
                identity_strategy=template.get("identity_strategy", "strict"),
                backoff=_policy(template.get("backoff")),
                register=False,
            )
            steps = list(template["steps"])
        except (KeyError, TypeError) as exc:
            raise WorkflowDefinitionError(
                f"Task template is missing {exc}; it needs name, namespace_name, version and steps."
            ) from None
        declared = {s.get("name") for s in steps}
        for raw in _topological(steps, declared):
            flow.add_step(_step_from_template(raw, resolve_handlers))
        flow.validate()
        if register:
            _register(flow)
        return flow

    @classmethod
    def from_yaml(cls, path: str | Path, *, resolve_handlers: bool = True) -> Workflow:
        """Load a YAML task template (seed format) whose handlers are ``module:function``."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise WorkflowDefinitionError(f"Cannot read task template {path}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise WorkflowDefinitionError(f"Task template {path} is not a YAML mapping.")
        return cls.from_template(data, resolve_handlers=resolve_handlers)


#: The longest step timeout accepted, in seconds (30 days).
MAX_TIMEOUT_S = 30 * 24 * 3600.0
#: The most attempts a step may have.
MAX_ATTEMPTS = 1000


def _check_step_settings(step: StepDefinition) -> None:
    where = f"Step {step.name!r}"
    attempts = step.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise WorkflowDefinitionError(
            f"{where}: max_attempts must be a whole number, got {attempts!r}."
        )
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise WorkflowDefinitionError(
            f"{where}: max_attempts must be between 1 and {MAX_ATTEMPTS}, got {attempts}."
        )
    if not isinstance(step.retryable, bool):
        raise WorkflowDefinitionError(f"{where}: retryable must be true or false.")
    timeout = step.timeout
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout <= MAX_TIMEOUT_S  # NaN fails this too
    ):
        raise WorkflowDefinitionError(
            f"{where}: timeout must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_S:.0f} (30 days), got {timeout!r}."
        )
    _step_names(step.depends_on, f"depends_on of step {step.name!r}")
    if step.handler is not None:
        _check_handler(step.name, step.handler)


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


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise WorkflowDefinitionError(
            f"{what.capitalize()} {value!r} is invalid: use 1-64 lower-case letters, digits or "
            "underscores, starting with a letter."
        )


def _policy(raw: Mapping[str, Any] | None) -> BackoffPolicy | None:
    if not raw:
        return None
    return BackoffPolicy(
        base_seconds=float(raw.get("backoff_base_ms", 1000)) / 1000,
        multiplier=float(raw.get("backoff_multiplier", 2.0)),
        max_seconds=float(raw.get("max_backoff_ms", 300_000)) / 1000,
        jitter=float(raw.get("jitter", 0.1)),
    )


def _step_from_template(raw: Mapping[str, Any], resolve: bool) -> StepDefinition:
    handler = raw.get("handler") or {}
    path = handler.get("callable", "")
    retry = raw.get("retry") or {}
    has_backoff = any(k in retry for k in ("backoff_base_ms", "max_backoff_ms"))
    return StepDefinition(
        name=raw["name"],
        handler_path=path,
        depends_on=_step_names(raw.get("dependencies") or (), f"dependencies of {raw['name']!r}"),
        max_attempts=int(retry.get("max_attempts", 3)),
        retryable=bool(retry.get("retryable", True)),
        timeout=raw.get("timeout_seconds"),
        backoff=_policy(retry) if has_backoff else None,
        inputs=dict(handler.get("initialization") or {}),
        description=raw.get("description", ""),
        handler=resolve_handler(path) if resolve else None,
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


def _topological(steps: list[Mapping[str, Any]], declared: set[Any]) -> list[Mapping[str, Any]]:
    """Order template steps so dependencies come first; reject unknown deps and cycles."""
    graph: dict[str, tuple[str, ...]] = {}
    by_name: dict[str, Mapping[str, Any]] = {}
    for raw in steps:
        name = raw.get("name")
        if not isinstance(name, str):
            raise WorkflowDefinitionError("Every template step needs a 'name'.")
        deps = tuple(raw.get("dependencies") or ())
        unknown = [d for d in deps if d not in declared]
        if unknown:
            raise WorkflowDefinitionError(f"Step {name!r} depends on unknown steps {unknown}.")
        if name in by_name:
            raise WorkflowDefinitionError(f"Two template steps are named {name!r}.")
        graph[name], by_name[name] = deps, raw
    return [by_name[n] for n in _check_acyclic(graph, "task template")]


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


def _register(flow: Workflow) -> None:
    _WORKFLOWS[flow.key] = flow
    for step in flow.steps.values():
        for listener in list(_LISTENERS):
            listener(flow, step)


def registered_workflows() -> list[Workflow]:
    """Every workflow defined in this process."""
    return list(_WORKFLOWS.values())


def on_step_declared(listener: Callable[[Workflow, StepDefinition], None]) -> None:
    """Call ``listener(flow, step)`` for every step declared now and later (used to bind actors)."""
    _LISTENERS.append(listener)
    for flow in list(_WORKFLOWS.values()):
        for step in flow.steps.values():
            listener(flow, step)

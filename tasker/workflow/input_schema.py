"""A workflow's ``input_schema``: a JSON Schema its task contexts must satisfy.

:func:`check_input_schema` runs when a definition is loaded (the schema itself must be valid, for
the draft its ``$schema`` names, or draft 2020-12 without one), its top level must accept
objects (a context is a mapping), and every ``$ref`` must resolve inside the schema: Tasker
fetches nothing from the network. :func:`validate_input` is what the
engine calls on a submitted context; it raises :class:`~tasker.exceptions.PayloadError` naming
the place inside the context::

    context["order"]["qty"]: -1 is less than the minimum of 1

``format`` keywords are annotations only (jsonschema's default): ``"format": "email"`` does not
reject a string that is not an e-mail address.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from tasker.exceptions import PayloadError, WorkflowDefinitionError

__all__ = ["DEFAULT_DRAFT", "check_input_schema", "context_path", "validate_input"]

#: The JSON Schema draft of a schema without ``$schema``.
DEFAULT_DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Unknown:
    """Stands for a ``$schema`` that names no draft jsonschema knows."""


def check_input_schema(schema: object, *, where: str = "input_schema") -> Mapping[str, Any]:
    """``schema`` if it is a valid JSON Schema object; else a :class:`WorkflowDefinitionError`.

    ``where`` starts the message (for example ``"order.yaml: input_schema"``).
    """
    if not isinstance(schema, Mapping):
        raise WorkflowDefinitionError(
            f"{where} must be a JSON Schema object (a mapping such as "
            f"{{type: object, required: [order]}}), got {type(schema).__name__}."
        )
    from jsonschema import exceptions  # imported when a schema is used, not with tasker

    validator_class = _validator_class(schema, where)
    try:
        validator_class.check_schema(schema)
    except exceptions.SchemaError as exc:
        place = "".join(f"[{json.dumps(part)}]" for part in exc.absolute_path)
        draft = validator_class.META_SCHEMA.get("$schema", DEFAULT_DRAFT)
        raise WorkflowDefinitionError(
            f"{where}{place} is not valid JSON Schema ({draft}): {exc.message}."
        ) from None
    _check_top_type(schema, where)
    _check_references(schema, validator_class, where)
    return schema


def validate_input(schema: Mapping[str, Any], context: object) -> None:
    """Raise :class:`PayloadError` unless ``context`` satisfies ``schema`` (checked at load).

    The message names the failing place inside the context and what is wrong; when several
    places fail, the most relevant one (jsonschema's ``best_match``) and the count of the rest.
    """
    from jsonschema import Draft202012Validator, exceptions, validators

    validator_class = validators.validator_for(schema, default=Draft202012Validator)
    try:
        errors = list(validator_class(schema).iter_errors(context))
    except Exception as exc:  # a schema stored before the load-time checks: say so plainly
        raise PayloadError(
            f"the workflow's input_schema cannot be applied ({type(exc).__name__}: {exc}); fix "
            "the schema and register a new version"
        ) from None
    if not errors:
        return
    error = exceptions.best_match(errors)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise PayloadError(f"{context_path(error.absolute_path)}: {error.message}{more}")


def context_path(parts: Iterable[str | int]) -> str:
    """``context["order"]["items"][0]`` for the path ``["order", "items", 0]``."""
    return "context" + "".join(
        f"[{part}]" if isinstance(part, int) else f"[{json.dumps(part)}]" for part in parts
    )


def _validator_class(schema: Mapping[str, Any], where: str) -> Any:
    from jsonschema import Draft202012Validator, validators

    declared = schema.get("$schema")
    if declared is not None and not isinstance(declared, str):
        raise WorkflowDefinitionError(
            f'{where}["$schema"] must be a string naming a JSON Schema draft, got {declared!r}.'
        )
    if declared is None:
        return Draft202012Validator
    found = validators.validator_for(schema, default=_Unknown)
    if found is _Unknown:
        raise WorkflowDefinitionError(
            f'{where}["$schema"] names no JSON Schema draft Tasker knows ({declared!r}): use '
            f"{DEFAULT_DRAFT!r} (the default) or another draft's URI, such as "
            "'http://json-schema.org/draft-07/schema#'."
        )
    return found


def _check_top_type(schema: Mapping[str, Any], where: str) -> None:
    """A context is a JSON object: a top-level ``type``, ``enum`` or ``const`` that excludes
    objects refuses them all."""
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else declared
    if isinstance(types, list) and "object" not in types:
        raise WorkflowDefinitionError(
            f'{where}["type"] is {declared!r}, but a task context is always an object, so no '
            "submit could pass: use type: object (and describe the fields under properties)."
        )
    allowed = {
        "const": [schema["const"]] if "const" in schema else None,
        "enum": schema.get("enum") if isinstance(schema.get("enum"), list) else None,
    }
    for keyword, values in allowed.items():
        if values is not None and not any(isinstance(value, Mapping) for value in values):
            raise WorkflowDefinitionError(
                f"{where}[{json.dumps(keyword)}] allows no object, but a task context is always "
                "an object, so no submit could pass: describe the context's fields under "
                "properties instead."
            )


_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples"})
#: The keywords that refer to another schema; each must resolve inside the schema.
_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")


def _describe(value: object) -> str:
    text = json.dumps(value)
    return f"the {type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


#: Keywords whose subschemas apply to the same instance as the schema that holds them: a loop
#: through these (and ``$ref``) never reaches a smaller part of the context.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas", "dependencies")


def _check_references(schema: Mapping[str, Any], validator_class: Any, where: str) -> None:
    """Refuse a ``$ref`` that does not resolve inside ``schema`` (jsonschema would only fail at
    the first submit that reaches it), and a loop of references that never descends into the
    context (``{"$ref": "#"}``, or two definitions that refer to each other): validating any
    context against it would recurse until Python gives up."""
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import specification_with

    dialect = validator_class.META_SCHEMA.get("$schema", DEFAULT_DRAFT)
    specification = specification_with(dialect, default=specification_with(DEFAULT_DRAFT))
    root = specification.create_resource(schema)
    resolver = Registry().with_resource(root.id() or "", root).crawl().resolver(root.id() or "")
    paths: dict[int, str] = {}  # id() of each schema mapping -> its path in the schema
    same_instance: dict[int, list[int]] = {}  # schemas applied to the same instance as it

    def walk(node: Any, resolver: Any, path: str) -> None:
        if isinstance(node, Mapping):
            paths[id(node)] = path
            resolver = resolver.in_subresource(specification.create_resource(node))
            targets = same_instance.setdefault(id(node), [])
            for keyword in _REFERENCES:
                reference = node.get(keyword)
                if not isinstance(reference, str):
                    continue
                place = f"{where}{path}[{json.dumps(keyword)}] {reference!r}"
                try:
                    target = resolver.lookup(reference).contents
                except Unresolvable:
                    raise WorkflowDefinitionError(
                        f"{place} does not resolve inside the schema; Tasker fetches no schema "
                        "from elsewhere: point it at a definition of this schema (for example "
                        "'#/$defs/address') or copy that schema in."
                    ) from None
                if not isinstance(target, (Mapping, bool)):
                    raise WorkflowDefinitionError(
                        f"{place} points at {_describe(target)}, not at a schema: point it at a "
                        "schema object (for example '#/$defs/address')."
                    )
                targets.append(id(target))
            targets.extend(id(sub) for sub in _in_place_subschemas(node))
            for key, value in node.items():
                if key not in _NOT_SCHEMAS:
                    walk(value, resolver, f"{path}[{json.dumps(key)}]")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, resolver, f"{path}[{index}]")

    walk(schema, resolver, "")
    loop = _find_loop(same_instance)
    if loop:
        chain = " -> ".join(f"{where}{paths[node]}" for node in loop)
        raise WorkflowDefinitionError(
            f"{where} refers back to itself without descending into the context ({chain}), so "
            "validating any context would never end: make the reference go through properties "
            "or items (a tree), or remove it."
        )


def _in_place_subschemas(node: Mapping[str, Any]) -> list[Any]:
    found: list[Any] = [node[key] for key in _IN_PLACE_ONE if isinstance(node.get(key), Mapping)]
    for key in _IN_PLACE_LIST:
        if isinstance(node.get(key), list):
            found += [sub for sub in node[key] if isinstance(sub, Mapping)]
    for key in _IN_PLACE_MAP:
        if isinstance(node.get(key), Mapping):
            found += [sub for sub in node[key].values() if isinstance(sub, Mapping)]
    return found


def _find_loop(edges: Mapping[int, list[int]]) -> list[int] | None:
    """A cycle of ``edges`` as the list of its nodes, first one repeated at the end; or None."""
    done: set[int] = set()
    for start in edges:
        if start in done:
            continue
        trail: list[int] = []
        on_trail: set[int] = set()
        stack: list[tuple[int, int]] = [(start, 0)]  # (node, index of its next edge)
        while stack:
            node, index = stack.pop()
            if index == 0:
                trail.append(node)
                on_trail.add(node)
            targets = edges.get(node, [])
            if index < len(targets):
                stack.append((node, index + 1))
                target = targets[index]
                if target in on_trail:
                    return [*trail[trail.index(target) :], target]
                if target not in done and target in edges:
                    stack.append((target, 0))
            else:
                trail.pop()
                on_trail.discard(node)
                done.add(node)
    return None

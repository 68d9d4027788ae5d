"""The tool's input schema, generated from the request model with the operator's values filled in.

One declaration, `ExecutionRequest`, says what a client may send: its fields' types, bounds and
descriptions are both the server's validation and the schema a client reads, so the two cannot
drift. The operator's values (caps, defaults, the languages) are filled in where the model names
them (`models.FROM_SETTINGS`, and description templates over the policy's fields).

The shape is flat, because client libraries convert schemas with converters that know little of
JSON Schema: no ``$defs``, ``$ref`` or ``anyOf``; an optional field is ``"type": [T, "null"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from codomyrmex_sandbox.models import FROM_SETTINGS, ExecutionRequest
from codomyrmex_sandbox.service import Sandbox

_FIRST = ("type", "enum", "default")  # a property's keys in this order, then its bounds, then its description


def input_schema(sandbox: Sandbox) -> dict[str, Any]:
    """The `execute_code` input schema, with the operator's caps as bounds so clients see them up front.

    Where languages have different caps, the schema shows the largest; a call above its own
    language's cap is refused with a message naming that cap. The defaults it states are those of
    the default language.
    """
    policies = list(sandbox.policies.values())
    default_language = ExecutionRequest.model_fields["language"].default
    # Without the default language, a call must name one; the base settings' defaults then stand in.
    default_policy = sandbox.policies.get(default_language) or sandbox.settings.policy()
    values: dict[str, Any] = default_policy.model_dump()
    values |= {name: max(getattr(p, name) for p in policies) for name in values if name.startswith("max_")}
    values["languages"] = sandbox.languages
    return flat_schema(ExecutionRequest, values)


def flat_schema(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema in the flat shape, with ``values`` filled in where the model names them.

    Raises TypeError for a model whose schema has no flat form (nested models, unions of types):
    a tool's arguments are kept simple enough for every client library.
    """
    generated = model.model_json_schema()
    if "$defs" in generated:
        raise TypeError(f"{model.__name__} has nested definitions; a tool's input schema must be flat")
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: _flat_property(name, spec, values) for name, spec in generated["properties"].items()},
    }
    for keyword in ("required", "additionalProperties"):
        if keyword in generated:
            schema[keyword] = generated[keyword]
    return schema


def _flat_property(name: str, generated: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    spec = {key: value for key, value in generated.items() if key != "title"}
    branches = spec.pop("anyOf", None)
    if branches is not None:  # pydantic's form of ``T | None``: the T branch carries T's bounds
        kinds = [branch for branch in branches if branch != {"type": "null"}]
        if len(kinds) != 1 or len(branches) != 2 or not isinstance(kinds[0].get("type"), str):  # noqa: PLR2004 - T and null
            raise TypeError(f"{name}: only an optional simple type has a flat form, not {branches}")
        spec = {**kinds[0], **spec, "type": [kinds[0]["type"], "null"]}
    for keyword, setting in spec.pop(FROM_SETTINGS, {}).items():
        spec[keyword] = values[setting]
    if "description" in spec:
        spec["description"] = spec["description"].format_map(values)
    first = {key: spec[key] for key in _FIRST if key in spec}
    bounds = {key: value for key, value in spec.items() if key not in first and key != "description"}
    return first | bounds | ({"description": spec["description"]} if "description" in spec else {})

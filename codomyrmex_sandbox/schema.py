"""Tool input schemas, generated from the argument models with the operator's values filled in.

One declaration, `ExecutionRequest`, says what a client may send: its fields' types, bounds and
descriptions are both the server's validation and the schema a client reads, so the two cannot
drift. The operator's values (caps, defaults, the languages) are filled in where the model names
them (`models.FROM_SETTINGS`, and description templates over the policy's fields).

The shape is the one every client library's converter accepts unchanged (google-genai's MCP and
``FunctionDeclaration(parameters=...)`` converters, openai-agents' and pydantic-ai's strict modes,
langchain, the MCP Inspector CLI), because those converters know little of JSON Schema:

- flat: no ``$defs``, ``$ref``, ``anyOf``, ``oneOf``, ``allOf``;
- each property has one plain string ``type``; an optional field is just its type (no type
  arrays, no ``"null"``: the server takes ``null`` for an optional argument as its default);
- no ``default`` keyword: a description states the default instead;
- ``minimum``/``maximum`` only (no ``exclusiveMinimum``/``exclusiveMaximum``), no ``format``;
- every array has ``items``; an ``enum`` lists strings;
- no ``additionalProperties`` (google-genai's converter fails on ``false``): the server still
  refuses an unknown argument, naming the accepted ones.

`portable_schema_problems` checks a schema against these rules; `flat_schema` refuses to produce
one that breaks them, so a tool added later cannot regress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from codomyrmex_sandbox.models import FROM_SETTINGS, ExecutionRequest
from codomyrmex_sandbox.service import Sandbox

_FIRST = ("type", "enum")  # a property's keys in this order, then its bounds, then its description

# The keywords a portable schema may use, by the ``type`` they belong to. Any other keyword is a
# problem: extend this only after checking the converters (tests/clients/test_schema_converters.py).
_COMMON = frozenset({"type", "description"})
_KEYWORDS: dict[str, frozenset[str]] = {
    "string": _COMMON | {"enum", "minLength", "maxLength"},
    "number": _COMMON | {"minimum", "maximum"},
    "integer": _COMMON | {"minimum", "maximum"},
    "boolean": _COMMON,
    "array": _COMMON | {"items", "minItems", "maxItems"},
    "object": _COMMON | {"properties", "required"},
}
_BOUNDS = ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems")


def input_schema(sandbox: Sandbox, model: type[BaseModel] = ExecutionRequest) -> dict[str, Any]:
    """A tool's input schema (`execute_code`'s by default), with the operator's caps as bounds so
    clients see them up front.

    Where languages have different caps, the schema shows the largest; a call above its own
    language's cap is refused with a message naming that cap. The defaults it states are those of
    the default language. On a server without sessions (``max_sessions = 0``) `execute_code` has
    no ``session_id``.
    """
    policies = list(sandbox.policies.values())
    default_language = ExecutionRequest.model_fields["language"].default
    # Without the default language, a call must name one; the base settings' defaults then stand in.
    default_policy = sandbox.policies.get(default_language) or sandbox.settings.policy()
    values: dict[str, Any] = default_policy.model_dump()
    values |= {name: max(getattr(p, name) for p in policies) for name in values if name.startswith("max_")}
    values["languages"] = sandbox.languages
    values["session_idle_timeout_seconds"] = sandbox.settings.session_idle_timeout_seconds
    schema = flat_schema(model, values)
    if model is ExecutionRequest and sandbox.settings.max_sessions == 0:
        del schema["properties"]["session_id"]
    return schema


def flat_schema(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema in the portable shape, with ``values`` filled in where the model names them.

    Raises TypeError for a model whose schema has no portable form (nested models, unions of types,
    a keyword outside the portable set, an optional field whose description does not state its
    default): a tool's arguments are kept simple enough for every client library.
    """
    generated = model.model_json_schema()
    definitions = generated.get("$defs", {})
    properties: dict[str, Any] = {}
    for name, spec in generated["properties"].items():
        properties[name] = _flat_property(name, spec, values, definitions)
        default = model.model_fields[name].default  # PydanticUndefined when required or made by a factory
        if default is not None and default is not PydanticUndefined:
            stated = f"default {default}".lower()
            if stated not in properties[name].get("description", "").lower():
                raise TypeError(f"{model.__name__}.{name}: its description must state its default ({stated!r})")
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if generated.get("required"):
        schema["required"] = generated["required"]
    problems = portable_schema_problems(schema)
    if problems:
        raise TypeError(f"{model.__name__}'s input schema is not portable: " + "; ".join(problems))
    return schema


def _flat_property(
    name: str, generated: Mapping[str, Any], values: Mapping[str, Any], definitions: Mapping[str, Any]
) -> dict[str, Any]:
    spec = {key: value for key, value in generated.items() if key not in {"title", "default"}}
    branches = spec.pop("anyOf", None)
    if branches is not None:  # pydantic's form of ``T | None``: the T branch carries T's bounds
        kinds = [branch for branch in branches if branch != {"type": "null"}]
        if len(kinds) != 1 or len(branches) != 2 or not isinstance(kinds[0].get("type"), str):  # noqa: PLR2004 - T and null
            raise TypeError(f"{name}: only an optional simple type has a flat form, not {branches}")
        spec = {**kinds[0], **spec}  # just T: the server takes null as the default
    items = spec.get("items")
    if isinstance(items, Mapping) and "$ref" in items:  # an array of objects: the object, inlined
        spec["items"] = _flat_object(name, definitions[items["$ref"].rsplit("/", 1)[-1]], values, definitions)
    elif "$ref" in spec:
        raise TypeError(f"{name}: a nested object has a flat form only as an array's items")
    for keyword, setting in spec.pop(FROM_SETTINGS, {}).items():
        spec[keyword] = values[setting]
    if "description" in spec:
        spec["description"] = spec["description"].format_map(values)
    first = {key: spec[key] for key in _FIRST if key in spec}
    bounds = {key: value for key, value in spec.items() if key not in first and key != "description"}
    return first | bounds | ({"description": spec["description"]} if "description" in spec else {})


def _flat_object(
    name: str, generated: Mapping[str, Any], values: Mapping[str, Any], definitions: Mapping[str, Any]
) -> dict[str, Any]:
    """An object nested in an array, inlined: its properties flat, like the top level's (no ``$ref``,
    no ``additionalProperties``: the server refuses unknown fields itself, naming them)."""
    properties = {
        field: _flat_property(f"{name}.{field}", spec, values, definitions)
        for field, spec in generated["properties"].items()
    }
    flat: dict[str, Any] = {"type": "object", "properties": properties}
    if generated.get("required"):
        flat["required"] = generated["required"]
    if generated.get("description"):
        flat["description"] = generated["description"]
    return flat


def portable_schema_problems(schema: Mapping[str, Any]) -> list[str]:
    """What, in a tool's input schema, some client library's converter would refuse or lose; [] when none.

    The rules are those in this module's docstring; each problem names where it is (a JSON
    pointer) and what to do instead.
    """
    problems: list[str] = []
    if schema.get("type") != "object":
        problems.append('/: an input schema is "type": "object"')
    _check_node(schema, "", problems, top=True)
    return problems


def _check_node(node: object, where: str, problems: list[str], *, top: bool = False) -> None:
    at = where or "/"
    if not isinstance(node, Mapping):
        problems.append(f"{at}: a schema is an object, not {type(node).__name__}")
        return
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in _KEYWORDS:
        problems.append(
            f"{at}: needs one plain type ({', '.join(_KEYWORDS)}), not {kind!r}"
            + ("; an optional field is just its type, and null means its default" if isinstance(kind, list) else "")
        )
        return
    problems.extend(
        f"{at}: {keyword!r} is not portable for type {kind!r}{_instead(keyword)}"
        for keyword in node
        if keyword not in _KEYWORDS[kind]
    )
    problems.extend(
        f"{at}: {bound} must be a number, not {node[bound]!r}"
        for bound in _BOUNDS
        if bound in node and (isinstance(node[bound], bool) or not isinstance(node[bound], int | float))
    )
    if "enum" in node and (
        not isinstance(node["enum"], list) or not node["enum"] or not all(isinstance(v, str) for v in node["enum"])
    ):
        problems.append(f"{at}: enum must be a non-empty list of strings")
    if kind == "array":
        if "items" in node:
            _check_node(node["items"], f"{where}/items", problems)
        else:
            problems.append(f"{at}: an array needs items (the type of its elements)")
    if kind == "object":
        properties = node.get("properties")
        if not isinstance(properties, Mapping) or (not properties and not top):
            problems.append(f"{at}: an object needs properties (converters in strict mode refuse an open object)")
            properties = {}
        for name, spec in properties.items():
            _check_node(spec, f"{where}/properties/{name}", problems)
        required = node.get("required", [])
        if not isinstance(required, list) or any(name not in properties for name in required):
            problems.append(f"{at}: required must list some of the properties, not {required!r}")


def _instead(keyword: str) -> str:
    advice = {
        "default": "; state the default in the description",
        "additionalProperties": "; leave it out (the server refuses unknown arguments itself)",
        "exclusiveMinimum": "; use minimum with an inclusive bound",
        "exclusiveMaximum": "; use maximum with an inclusive bound",
        "anyOf": "; use one plain type",
        "oneOf": "; use one plain type",
        "allOf": "; use one plain type",
        "$ref": "; inline the definition",
        "$defs": "; inline the definitions",
        "format": "; say the format in the description",
        "const": "; use an enum of one string",
        "title": "; leave it out (the property's name is its title)",
    }
    return advice.get(keyword, "")

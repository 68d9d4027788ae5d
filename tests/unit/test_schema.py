"""Tool input schemas are generated from the argument models, in the shape every client library accepts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import jsonschema
import pytest
from mcp import Client
from pydantic import BaseModel, Field

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.models import (
    LENIENT_INT,
    CloseSessionRequest,
    CreateSessionRequest,
    ListSessionsRequest,
    ToolArguments,
    request_from_arguments,
)
from codomyrmex_sandbox.schema import flat_schema, input_schema, portable_schema_problems
from codomyrmex_sandbox.server import build_server

# The schema clients see with default settings. Its shape is the portable one (issue 9): one plain
# type per property, no `default`, no `additionalProperties`, `minimum` rather than `exclusiveMinimum`.
EXPECTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {
            "type": "string",
            "minLength": 1,
            "maxLength": 1048576,
            "description": "The program to run, UTF-8 source of at most 1048576 bytes.",
        },
        "language": {
            "type": "string",
            "enum": ["bash", "javascript", "python"],
            "description": "The runtime to run the code in. Default python.",
        },
        "stdin": {
            "type": "string",
            "maxLength": 1048576,
            "description": "Text for the program's standard input; without it the program reads EOF.",
        },
        "timeout_seconds": {
            "type": "number",
            "minimum": 0.001,
            "maximum": 300.0,
            "description": "Wall-clock limit in seconds; default 30 s.",
        },
        "memory_mb": {
            "type": "integer",
            "minimum": 16,
            "maximum": 2048,
            "description": "Memory limit in MiB, swap included; default 256 MiB.",
        },
        "files": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "path": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 1024,
                        "description": "Relative POSIX path under the working directory, e.g. data/input.csv: no "
                        "leading /, no . or .. component, at most 255 bytes per component and 1024 in all.",
                    },
                    "content": {
                        "type": "string",
                        "description": "The file's content: UTF-8 text, or base64 when encoding is base64.",
                    },
                    "encoding": {
                        "type": "string",
                        "enum": ["utf-8", "base64"],
                        "description": "How content is encoded: utf-8 (text) or base64 (binary). Default utf-8.",
                    },
                },
                "required": ["path", "content"],
                "description": "One file to place in the sandbox's working directory before the program starts.",
            },
            "maxItems": 64,
            "description": "Files to place in the working directory (/sandbox) before the program starts, e.g. "
            "data to analyse or a project whose tests to run: at most 64 files and 16777216 bytes in all "
            "(decoded). Default none. Files the program creates or changes there come back in the result's "
            "files, and Python's matplotlib figures in its figures.",
        },
        "session_id": {
            "type": "string",
            "maxLength": 64,
            "description": "Run in this session (from create_session), whose interpreter keeps variables, imports, "
            "functions, the current directory and files from call to call. Default none: a fresh sandbox that "
            "keeps nothing. With a session, language may be left out, memory_mb is the session's (leave it out), "
            "and timeout_seconds applies to this call alone.",
        },
    },
    "required": ["code"],
}


def sandbox_with(**overrides: Any) -> Sandbox:
    return Sandbox(Settings.load(backend="fake", **overrides), backend=FakeBackend())


def test_the_generated_schema_for_default_settings():
    generated = input_schema(sandbox_with())
    # Sorted keys: the same keywords with the same values, and numbers of the same JSON type (300.0, not 300).
    assert json.dumps(generated, sort_keys=True) == json.dumps(EXPECTED, sort_keys=True)


def test_without_sessions_execute_code_has_no_session_id():
    assert "session_id" not in input_schema(sandbox_with(max_sessions=0))["properties"]


def test_the_session_tools_schemas_are_portable_and_carry_the_caps():
    sandbox = sandbox_with(session_idle_timeout_seconds=120)
    create = input_schema(sandbox, CreateSessionRequest)
    assert portable_schema_problems(create) == []
    assert create["properties"]["idle_timeout_seconds"]["maximum"] == 120
    assert "default 120 s" in create["properties"]["idle_timeout_seconds"]["description"]
    assert create["properties"]["language"]["enum"] == sandbox.languages
    close = input_schema(sandbox, CloseSessionRequest)
    assert close["required"] == ["session_id"] and portable_schema_problems(close) == []
    assert input_schema(sandbox, ListSessionsRequest) == {"type": "object", "properties": {}}


def test_the_schema_shows_the_largest_cap_across_languages_and_the_default_languages_defaults():
    schema = input_schema(
        sandbox_with(
            language_limits={
                "python": {"max_memory_mb": 4096, "default_timeout_seconds": 7.5, "max_code_bytes": 5},
                "bash": {"max_timeout_seconds": 900, "max_stdin_bytes": 3, "default_memory_mb": 99},
            }
        )
    )
    properties = schema["properties"]
    assert properties["memory_mb"]["maximum"] == 4096
    assert properties["timeout_seconds"]["maximum"] == 900
    assert properties["code"]["maxLength"] == 1024 * 1024
    assert properties["code"]["description"] == "The program to run, UTF-8 source of at most 1048576 bytes."
    assert properties["stdin"]["maxLength"] == 1024 * 1024
    assert properties["timeout_seconds"]["description"] == "Wall-clock limit in seconds; default 7.5 s."
    assert properties["memory_mb"]["description"] == "Memory limit in MiB, swap included; default 256 MiB."


def test_the_language_enum_is_the_languages_offered():
    schema = input_schema(sandbox_with(languages=["bash", "python"]))
    assert schema["properties"]["language"]["enum"] == ["bash", "python"]


async def test_every_tools_input_schema_is_portable():
    # Every tool the server lists, so that a tool added later is checked without a new test.
    async with sandbox_with() as sandbox, Client(build_server(sandbox)) as client:
        tools = (await client.list_tools()).tools
    assert tools
    for tool in tools:
        assert portable_schema_problems(tool.input_schema) == [], tool.name
        used = set(keywords(tool.input_schema))
        unportable = {"$defs", "$ref", "anyOf", "oneOf", "allOf", "default", "exclusiveMinimum", "format"}
        assert used.isdisjoint(unportable | {"additionalProperties"}), (tool.name, used)
        assert "null" not in json.dumps([spec["type"] for spec in tool.input_schema["properties"].values()])


def keywords(node: Any) -> list[str]:
    """Every keyword used anywhere in a schema (property names are not keywords)."""
    if not isinstance(node, dict):
        return []
    found = [key for key in node if key != "properties"]
    for key, value in node.items():
        children = value.values() if key == "properties" else [value] if isinstance(value, dict) else []
        for child in children:
            found += keywords(child)
    return found


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        pytest.param(
            {"type": "array", "items": {"type": "string"}}, '/: an input schema is "type": "object"', id="root"
        ),
        pytest.param({"type": "object", "properties": {}, "additionalProperties": False}, "leave it out", id="closed"),
        pytest.param(
            {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}, "plain type", id="nullable"
        ),
        pytest.param({"type": "object", "properties": {"a": {"type": "null"}}}, "plain type", id="null"),
        pytest.param({"type": "object", "properties": {"a": {"description": "untyped"}}}, "plain type", id="untyped"),
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "string", "default": "x"}}}, "in the description", id="dflt"
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}}, "inclusive", id="excl"
        ),
        pytest.param({"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}}, "format", id="fmt"),
        pytest.param(
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
            "plain type",
            id="anyOf",
        ),
        pytest.param({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "plain type", id="ref"),
        pytest.param({"type": "object", "properties": {}, "$defs": {"A": {"type": "string"}}}, "inline", id="defs"),
        pytest.param({"type": "object", "properties": {"a": {"type": "array"}}}, "needs items", id="array"),
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "array", "items": {"type": ["string", "null"]}}}},
            "/properties/a/items",
            id="items",
        ),
        pytest.param({"type": "object", "properties": {"a": {"type": "object"}}}, "needs properties", id="open"),
        pytest.param({"type": "object", "properties": {"a": {"type": "integer", "enum": [1, 2]}}}, "enum", id="enum"),
        pytest.param({"type": "object", "properties": {"a": {"type": "string", "enum": []}}}, "enum", id="enum-0"),
        pytest.param({"type": "object", "properties": {"a": {"type": "integer", "minimum": "1"}}}, "number", id="min"),
        pytest.param({"type": "object", "properties": {"a": {"type": "string", "minimum": 1}}}, "'minimum'", id="ty"),
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required", id="r"
        ),
        pytest.param({"type": "object", "properties": {"a": {"type": "string", "title": "A"}}}, "title", id="title"),
    ],
)
def test_the_portability_check_names_each_unportable_form(schema, problem):
    problems = portable_schema_problems(schema)
    assert problems, schema
    assert any(problem in text for text in problems), problems


def test_a_portable_schema_with_an_array_and_a_nested_object_passes():
    schema = {
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "maxItems": 10,
                "items": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "content": {"type": "string", "maxLength": 5}},
                    "required": ["path"],
                },
            },
            "keep": {"type": "boolean", "description": "Default false."},
        },
    }
    assert portable_schema_problems(schema) == []


def test_a_model_with_no_portable_form_is_refused():
    class Inner(BaseModel):
        value: int

    class Nested(BaseModel):
        inner: Inner

    class Union(BaseModel):
        either: int | str | None = None

    class Exclusive(ToolArguments):
        positive: float = Field(gt=0, description="Above zero.")

    class Unstated(ToolArguments):
        count: int = Field(default=10, description="How many.")

    class BoundAfterTheLenientForm(ToolArguments):
        size: Annotated[int, LENIENT_INT, Field(ge=1)] = Field(default=1, description="Default 1.")

    with pytest.raises(TypeError, match="flat"):
        flat_schema(Nested, {})
    with pytest.raises(TypeError, match="either"):
        flat_schema(Union, {})
    with pytest.raises(TypeError, match="exclusiveMinimum"):
        flat_schema(Exclusive, {})
    with pytest.raises(TypeError, match="must state its default \\('default 10'\\)"):
        flat_schema(Unstated, {})
    with pytest.raises(TypeError, match="'ge' is not portable"):
        flat_schema(BoundAfterTheLenientForm, {})


def test_a_later_tools_model_gets_the_same_shape():
    class Later(ToolArguments):
        session_id: str = Field(description="The session.")
        limit: Annotated[int, Field(ge=1, le=100), LENIENT_INT] = Field(default=10, description="Default 10.")
        note: str | None = Field(default=None, description="Optional.")
        paths: list[str] = Field(default_factory=list, description="Files to return; none by default.")

    assert flat_schema(Later, {}) == {
        "type": "object",
        "properties": {
            "session_id": {"type": "string", "description": "The session."},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Default 10."},
            "note": {"type": "string", "description": "Optional."},
            "paths": {"type": "array", "items": {"type": "string"}, "description": "Files to return; none by default."},
        },
        "required": ["session_id"],
    }


def verdicts(arguments: dict[str, Any]) -> tuple[bool, bool]:
    """(valid by the schema, accepted by the server) for ``arguments`` under default settings."""
    sandbox = sandbox_with()
    by_schema = jsonschema.Draft202012Validator(input_schema(sandbox)).is_valid(arguments)
    try:
        sandbox.effective_limits(request_from_arguments(arguments))
    except SandboxError:
        return by_schema, False
    return by_schema, True


@pytest.mark.parametrize(
    "arguments",
    [
        {"code": "x", "memory_mb": 15},
        {"code": "x", "memory_mb": 16},
        {"code": "x", "memory_mb": 2048},
        {"code": "x", "memory_mb": 2049},
        {"code": "x", "memory_mb": 64.5},
        {"code": "x", "memory_mb": True},
        {"code": "x", "timeout_seconds": 0},
        {"code": "x", "timeout_seconds": 0.0009},
        {"code": "x", "timeout_seconds": -1},
        {"code": "x", "timeout_seconds": 0.001},
        {"code": "x", "timeout_seconds": 300},
        {"code": "x", "timeout_seconds": 300.5},
        {"code": "x", "timeout_seconds": True},
        {"code": "x", "language": "bash", "stdin": ""},
        {"code": "x", "stdin": 5},
        {"code": 5},
        {"code": None},
        {},
    ],
)
def test_the_schema_and_the_server_agree_on_what_is_valid(arguments):
    by_schema, by_server = verdicts(arguments)
    assert by_schema == by_server


def test_an_unknown_argument_is_refused_by_the_server_though_the_schema_does_not_say_so():
    # No `additionalProperties: false` in the schema (google-genai's converter fails on it); the server
    # still refuses, naming the accepted arguments.
    assert verdicts({"code": "x", "privileged": True}) == (True, False)
    with pytest.raises(SandboxError, match=r"unknown argument 'privileged' \(accepted: code, language, stdin"):
        request_from_arguments({"code": "x", "privileged": True})


@pytest.mark.parametrize(
    "arguments",
    [
        {"code": "x", "language": None, "stdin": None, "timeout_seconds": None, "memory_mb": None},
        {"code": "x", "memory_mb": "64"},
        {"code": "x", "timeout_seconds": "5"},
    ],
)
def test_the_lenient_forms_are_the_only_calls_the_server_takes_beyond_the_schema(arguments):
    # Each is one a client sends for a value of the schema's type (see tests/unit/test_arguments.py).
    assert verdicts(arguments) == (False, True)


def test_a_whole_number_float_is_an_integer_to_the_schema_and_the_server_alike():
    assert verdicts({"code": "x", "memory_mb": 64.0}) == (True, True)

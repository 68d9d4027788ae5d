"""The tool's input schema is generated from the request model, with the operator's values filled in."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.models import request_from_arguments
from codomyrmex_sandbox.schema import flat_schema, input_schema

# The schema as it was written by hand before it was generated (default settings): clients must
# see exactly this until the client-compatibility issue changes its shape on purpose.
HAND_WRITTEN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {
            "type": "string",
            "description": "The program to run, UTF-8 source of at most 1048576 bytes.",
            "minLength": 1,
            "maxLength": 1048576,
        },
        "language": {
            "type": "string",
            "enum": ["bash", "javascript", "python"],
            "default": "python",
            "description": "The runtime to run the code in.",
        },
        "stdin": {
            "type": ["string", "null"],
            "default": None,
            "maxLength": 1048576,
            "description": "Text for the program's standard input; without it the program reads EOF.",
        },
        "timeout_seconds": {
            "type": ["number", "null"],
            "default": None,
            "exclusiveMinimum": 0,
            "maximum": 300.0,
            "description": "Wall-clock limit; default 30 s.",
        },
        "memory_mb": {
            "type": ["integer", "null"],
            "default": None,
            "minimum": 16,
            "maximum": 2048,
            "description": "Memory limit, swap included; default 256 MiB.",
        },
    },
    "required": ["code"],
    "additionalProperties": False,
}


def sandbox_with(**overrides: Any) -> Sandbox:
    return Sandbox(Settings.load(backend="fake", **overrides), backend=FakeBackend())


def test_the_generated_schema_is_the_hand_written_one_for_default_settings():
    generated = input_schema(sandbox_with())
    # Sorted keys: the same keywords with the same values, and numbers of the same JSON type (300.0, not 300).
    assert json.dumps(generated, sort_keys=True) == json.dumps(HAND_WRITTEN, sort_keys=True)


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
    assert properties["timeout_seconds"]["description"] == "Wall-clock limit; default 7.5 s."
    assert properties["memory_mb"]["description"] == "Memory limit, swap included; default 256 MiB."


def test_the_language_enum_is_the_languages_offered():
    schema = input_schema(sandbox_with(languages=["bash", "python"]))
    assert schema["properties"]["language"]["enum"] == ["bash", "python"]


def test_the_schema_is_flat():
    text = json.dumps(input_schema(sandbox_with()))
    for keyword in ("$defs", "$ref", "anyOf", "title", "x-from-settings"):
        assert keyword not in text


def test_a_model_with_no_flat_form_is_refused():
    class Inner(BaseModel):
        value: int

    class Nested(BaseModel):
        inner: Inner

    class Union(BaseModel):
        either: int | str | None = None

    with pytest.raises(TypeError, match="flat"):
        flat_schema(Nested, {})
    with pytest.raises(TypeError, match="either"):
        flat_schema(Union, {})


@pytest.mark.parametrize(
    "arguments",
    [
        {"code": "x", "memory_mb": 15},
        {"code": "x", "memory_mb": 16},
        {"code": "x", "memory_mb": 2048},
        {"code": "x", "memory_mb": 2049},
        {"code": "x", "memory_mb": "64"},
        {"code": "x", "timeout_seconds": 0},
        {"code": "x", "timeout_seconds": -1},
        {"code": "x", "timeout_seconds": 0.001},
        {"code": "x", "timeout_seconds": 300},
        {"code": "x", "timeout_seconds": 300.5},
        {"code": "x", "timeout_seconds": True},
        {"code": "x", "language": "bash", "stdin": None},
        {"code": "x", "stdin": 5},
        {"code": 5},
        {"code": "x", "privileged": True},
        {},
    ],
)
def test_the_schema_and_the_server_agree_on_what_is_valid(arguments):
    sandbox = sandbox_with()
    by_schema = jsonschema.Draft202012Validator(input_schema(sandbox)).is_valid(arguments)
    try:
        sandbox.effective_limits(request_from_arguments(arguments))
    except SandboxError:
        by_server = False
    else:
        by_server = True
    assert by_schema == by_server

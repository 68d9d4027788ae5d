"""Lenient argument forms: what clients send that means one thing is accepted, junk is still refused.

Through the MCP adapter with a real in-process client, over the fake backend, so that each accepted
form is seen to reach the backend as the value it stands for and each refused one to start nothing.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client

from codomyrmex_sandbox import FakeBackend, InvalidRequestError, Sandbox, Settings
from codomyrmex_sandbox.backends.fake import echo_stdin
from codomyrmex_sandbox.models import ExecutionRequest, request_from_arguments
from codomyrmex_sandbox.server import build_server


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[Client, FakeBackend]]:
    backend = FakeBackend(echo_stdin)
    async with (
        Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        yield client, backend


# What the backend is handed: (language, stdin, timeout_seconds, memory_mb). The defaults: python,
# no stdin, 30 s, 256 MiB.
DEFAULTS = ("python", None, 30.0, 256)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        pytest.param({"language": None}, DEFAULTS, id="language-null"),
        pytest.param({"stdin": None}, DEFAULTS, id="stdin-null"),
        pytest.param({"timeout_seconds": None}, DEFAULTS, id="timeout-null"),
        pytest.param({"memory_mb": None}, DEFAULTS, id="memory-null"),
        pytest.param(
            # What a strict-mode client sends: every field, null for those the model left unset.
            {"language": None, "stdin": None, "timeout_seconds": None, "memory_mb": 64.0},
            ("python", None, 30.0, 64),
            id="strict-client",
        ),
        pytest.param({"memory_mb": 64.0}, ("python", None, 30.0, 64), id="memory-whole-float"),
        pytest.param({"memory_mb": "64"}, ("python", None, 30.0, 64), id="memory-string"),
        pytest.param({"memory_mb": "64.0"}, ("python", None, 30.0, 64), id="memory-string-whole-float"),
        pytest.param({"memory_mb": "6.4e1"}, ("python", None, 30.0, 64), id="memory-string-exponent"),
        pytest.param({"timeout_seconds": "5"}, ("python", None, 5.0, 256), id="timeout-string"),
        pytest.param({"timeout_seconds": "2.5"}, ("python", None, 2.5, 256), id="timeout-string-fraction"),
        pytest.param({"timeout_seconds": 5}, ("python", None, 5.0, 256), id="timeout-integer"),
        pytest.param({"timeout_seconds": "0.001"}, ("python", None, 0.001, 256), id="timeout-minimum"),
        pytest.param(
            {"language": "bash", "stdin": "hi", "timeout_seconds": "7", "memory_mb": "32"},
            ("bash", b"hi", 7.0, 32),
            id="inspector-cli-strings",
        ),
    ],
)
async def test_a_lenient_form_runs_with_the_value_it_stands_for(arguments, expected):
    async with connected() as (client, backend):
        result = await client.call_tool("execute_code", {"code": "print(1)", **arguments})
    assert result.is_error is False, result.content
    (job,) = backend.jobs
    assert (job.runtime.name, job.stdin, job.limits.timeout_seconds, job.limits.memory_mb) == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            {"memory_mb": "256m; --privileged"},
            "memory_mb: Input should be a number; the string '256m; --privileged' is not one (send a plain number",
            id="injection",
        ),
        pytest.param({"memory_mb": "0x40"}, "memory_mb: Input should be a number; the string '0x40'", id="hex"),
        pytest.param({"memory_mb": " 64"}, "memory_mb: Input should be a number; the string ' 64'", id="space"),
        pytest.param({"memory_mb": "64 "}, "memory_mb: Input should be a number; the string '64 '", id="trailing"),
        pytest.param({"memory_mb": "+64"}, "memory_mb: Input should be a number; the string '+64'", id="plus"),
        pytest.param({"memory_mb": "064"}, "memory_mb: Input should be a number; the string '064'", id="zero"),
        pytest.param({"memory_mb": "1_024"}, "memory_mb: Input should be a number; the string '1_024'", id="under"),
        pytest.param({"memory_mb": ""}, "memory_mb: Input should be a number; the string ''", id="empty"),
        pytest.param({"memory_mb": 64.5}, "memory_mb: Input should be a whole number, not 64.5", id="fraction"),
        pytest.param({"memory_mb": "64.5"}, "memory_mb: Input should be a whole number, not 64.5", id="str-fraction"),
        pytest.param({"memory_mb": True}, "memory_mb: Input should be a number, not a boolean", id="true"),
        pytest.param({"memory_mb": [64]}, "memory_mb: Input should be a number, not a list", id="list"),
        pytest.param({"memory_mb": {"mb": 64}}, "memory_mb: Input should be a number, not an object", id="object"),
        pytest.param({"memory_mb": "8"}, "memory_mb: Input should be greater than or equal to 16", id="below"),
        pytest.param({"memory_mb": "4096"}, "memory_mb=4096 is above this server's cap of 2048 MiB", id="above"),
        pytest.param(
            {"timeout_seconds": "NaN"}, "timeout_seconds: Input should be a number; the string 'NaN'", id="nan"
        ),
        pytest.param(
            {"timeout_seconds": "inf"}, "timeout_seconds: Input should be a number; the string 'inf'", id="inf"
        ),
        pytest.param(
            {"timeout_seconds": "-Infinity"},
            "timeout_seconds: Input should be a number; the string '-Infinity'",
            id="-inf",
        ),
        pytest.param({"timeout_seconds": "1e999"}, "timeout_seconds: Input should be a finite number", id="overflow"),
        pytest.param(
            {"timeout_seconds": False}, "timeout_seconds: Input should be a number, not a boolean", id="false"
        ),
        pytest.param(
            {"timeout_seconds": "0"}, "timeout_seconds: Input should be greater than or equal to 0.001", id="0"
        ),
        pytest.param(
            {"timeout_seconds": "30s"}, "timeout_seconds: Input should be a number; the string '30s'", id="unit"
        ),
        pytest.param({"code": None}, "code: Input should be a valid string", id="code-null"),
        pytest.param({"stdin": 5}, "stdin: Input should be a valid string", id="stdin-number"),
        pytest.param({"language": 5}, "language: Input should be a valid string", id="language-number"),
        pytest.param(
            {"privileged": None}, "unknown argument 'privileged' (accepted: code, language", id="unknown-null"
        ),
    ],
)
async def test_junk_is_refused_naming_the_argument_and_what_to_send(arguments, message):
    async with connected() as (client, backend):
        result = await client.call_tool("execute_code", {"code": "print(1)", **arguments})
    assert result.is_error is True
    assert result.structured_content is None
    assert message in result.content[0].text  # type: ignore[union-attr]
    assert backend.jobs == []


def test_a_refused_string_is_quoted_only_in_part():
    with pytest.raises(InvalidRequestError) as refused:
        request_from_arguments({"code": "x", "memory_mb": "1" * 30 + "x" * 10_000})
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "Input should be a finite number, not NaN or infinity"),
        (math.inf, "Input should be a finite number, not NaN or infinity"),
        (-math.inf, "Input should be a finite number, not NaN or infinity"),
    ],
)
async def test_nan_and_infinity_floats_are_refused_by_the_python_api(value, message):
    backend = FakeBackend(echo_stdin)
    async with Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox:
        for arguments in ({"timeout_seconds": value}, {"memory_mb": value}):
            with pytest.raises(InvalidRequestError, match=f"{next(iter(arguments))}: {message}"):
                await sandbox.execute("print(1)", **arguments)
    assert backend.jobs == []


async def test_the_python_api_takes_the_same_lenient_forms():
    backend = FakeBackend(echo_stdin)
    lenient: dict[str, Any] = {"language": None, "stdin": None, "timeout_seconds": "5", "memory_mb": 64.0}
    async with Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox:
        result = await sandbox.execute("print(1)", **lenient)
        with pytest.raises(InvalidRequestError, match="memory_mb: Input should be a number, not a boolean"):
            await sandbox.execute("print(1)", memory_mb=True)
    assert result.status == "success"
    (job,) = backend.jobs
    assert (job.runtime.name, job.stdin, job.limits.timeout_seconds, job.limits.memory_mb) == ("python", None, 5.0, 64)
    assert ExecutionRequest(code="x", memory_mb="64", language=None).model_dump() == {  # type: ignore[arg-type]
        "code": "x",
        "language": "python",
        "stdin": None,
        "timeout_seconds": None,
        "memory_mb": 64,
        "files": None,
        "session_id": None,
    }

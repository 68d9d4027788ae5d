"""The execute_code tool through a real MCP client, in-process, over the fake backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from mcp import Client
from mcp_types import ProgressNotification

from codomyrmex_sandbox import FakeBackend, FakeRun, Sandbox, Settings
from codomyrmex_sandbox.server import build_server


async def greets(run: FakeRun) -> int:
    await run.write(f"hello {run.stdin or ''}\n")
    await run.write("warning\n", "stderr")
    run.return_value = "'done'"
    return 0


@asynccontextmanager
async def connected() -> AsyncIterator[Client]:
    # A context manager, not a fixture: the client's task group must open and close in one task.
    async with (
        Sandbox(Settings.load(backend="fake"), backend=FakeBackend(greets)) as sandbox,
        Client(build_server(sandbox)) as connected,
    ):
        yield connected


async def test_the_tool_schema_shows_the_bounds_and_forbids_unknown_arguments():
    async with connected() as client:
        tool = next(t for t in (await client.list_tools()).tools if t.name == "execute_code")
        assert tool.name == "execute_code"
        schema = tool.input_schema
        # No additionalProperties (a client converter fails on it): the server refuses unknown arguments itself.
        assert "additionalProperties" not in schema
        assert schema["required"] == ["code"]
        assert schema["properties"]["language"]["enum"] == ["bash", "javascript", "python"]
        assert schema["properties"]["timeout_seconds"]["maximum"] == 300
        assert schema["properties"]["memory_mb"]["maximum"] == 2048
        assert schema["properties"]["memory_mb"]["minimum"] == 16
        assert schema["properties"]["code"]["maxLength"] == 1024 * 1024
        assert set(tool.output_schema["properties"]) >= {
            "execution_id",
            "status",
            "exit_code",
            "stdout",
            "return_value",
        }
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint is False
        assert tool.annotations.open_world_hint is False


async def test_a_program_that_ran_is_a_structured_result_and_a_short_text():
    async with connected() as client:
        result = await client.call_tool("execute_code", {"code": "print('hello')", "stdin": "you"})
        assert result.is_error is False
        data = result.structured_content
        assert data is not None
        assert data["status"] == "success"
        assert data["stdout"] == "hello you\n"
        assert data["stderr"] == "warning\n"
        assert data["return_value"] == "'done'"
        text = result.content[0].text  # type: ignore[union-attr]
        assert text.startswith("status: success (exit code 0)")
        assert text.index("hello you") < text.index("warning")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"code": "x", "language": "cobol"}, "unknown language 'cobol'; use one of: bash, javascript, python"),
        ({"code": "x", "timeout_seconds": 301}, "cap of 300 seconds"),
        ({"code": "x", "memory_mb": 99999}, "cap of 2048 MiB"),
        ({"code": "x", "privileged": True}, "unknown argument 'privileged'"),
        ({"code": "x\x00"}, "NUL"),
        ({"code": 5}, "code: Input should be a valid string"),
        ({}, "code: Field required"),
    ],
)
async def test_a_call_that_never_ran_is_an_error_result_saying_what_to_change(arguments, message):
    async with connected() as client:
        result = await client.call_tool("execute_code", arguments)
        assert result.is_error is True
        assert result.structured_content is None
        assert message in result.content[0].text  # type: ignore[union-attr]
        after = await client.call_tool("execute_code", {"code": "print(1)"})
        assert after.is_error is False


async def test_output_is_streamed_as_progress_when_the_client_asks():
    gate = anyio.Event()
    updates: list[tuple[float, float | None, str | None]] = []

    async def slow(run: FakeRun) -> int:
        await run.write("first\n")
        await run.write("oops\n", "stderr")
        with anyio.fail_after(5):
            await gate.wait()
        await run.write("second\n")
        return 0

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))
        if message and "first" in message:
            gate.set()

    async with (
        Sandbox(Settings.load(backend="fake"), backend=FakeBackend(slow)) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        result = await client.call_tool(
            "execute_code", {"code": "x", "timeout_seconds": 10}, progress_callback=on_progress
        )
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == "first\nsecond\n"
    streamed = "".join(message or "" for _, _, message in updates)
    assert "first\n" in streamed
    assert "[stderr] oops\n" in streamed
    assert "second\n" in streamed
    assert all(total == 10 for _, total, _ in updates)


async def test_without_a_progress_token_nothing_is_streamed():
    # Over JSON-RPC (mode="legacy": the in-memory transport, framed as over stdio) the client hands
    # every notification to its message handler, whether or not a request waits for it: `observe`
    # sees any progress the server sends. Each call's timeout is the `total` of its progress.
    seen: list[float | None] = []
    control_seen = anyio.Event()

    async def observe(message: object) -> None:
        if isinstance(message, ProgressNotification):
            seen.append(message.params.total)
            if message.params.total == 9:
                control_seen.set()

    async def ignore(progress: float, total: float | None, message: str | None) -> None:
        pass

    async with (
        Sandbox(Settings.load(backend="fake"), backend=FakeBackend(greets)) as sandbox,
        Client(build_server(sandbox), mode="legacy", message_handler=observe) as client,
    ):
        result = await client.call_tool("execute_code", {"code": "x", "timeout_seconds": 7})
        # The control: the same program with a token is streamed, and `observe` sees it. Notifications
        # arrive in order, so once it has, anything the call without a token sent has been seen too.
        control = await client.call_tool("execute_code", {"code": "x", "timeout_seconds": 9}, progress_callback=ignore)
        with anyio.fail_after(5):
            await control_seen.wait()
    assert result.is_error is False
    assert control.is_error is False
    assert [total for total in seen if total != 9] == [], "the call without a progress token was streamed"


async def test_an_unknown_tool_is_a_protocol_error():
    async with connected() as client:
        with pytest.raises(Exception, match="unknown tool"):
            await client.call_tool("run_shell", {"cmd": "id"})


async def test_the_tool_says_its_world_is_open_only_when_egress_is_granted():
    settings = Settings.load(backend="fake", language_limits={"python": {"network": "egress"}})
    async with Sandbox(settings, backend=FakeBackend(greets)) as sandbox, Client(build_server(sandbox)) as client:
        tool = next(t for t in (await client.list_tools()).tools if t.name == "execute_code")
    assert tool.annotations is not None
    assert tool.annotations.open_world_hint is True
    assert "outbound internet access for python" in (tool.description or "")

"""The MCP adapter: the `execute_code` tool over any MCP transport.

It knows nothing about Docker: it turns tool arguments into a request for the `Sandbox`
service, progress tokens into streamed output, and results or errors into MCP results. A program
that ran is a normal result whatever its status; a call that never ran is ``isError: true`` with a
message that says what to do.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import ExecutionResult
from codomyrmex_sandbox.output import StreamName
from codomyrmex_sandbox.service import Sandbox

TOOL_NAME = "execute_code"
STREAM_INTERVAL_SECONDS = 0.1
STREAM_MESSAGE_CHARS = 16_384
STREAM_BACKLOG_CHARS = 65_536
MESSAGE_OVERHEAD_CHARS = 65_536  # everything in a request besides its code and stdin
SKIP_PIECE_CHARS = 1 << 20  # the rest of an over-long line is read and dropped this much at a time


def input_schema(sandbox: Sandbox) -> dict[str, Any]:
    """The tool's input schema, with the operator's caps as bounds so clients see them up front.

    Where languages have different caps, the schema shows the largest; a call above its own
    language's cap is refused with a message naming that cap.
    """
    policies = [sandbox.settings.policy(language) for language in sandbox.languages]
    defaults = sandbox.settings.policy("python" if "python" in sandbox.languages else None)
    caps = {
        "max_code_bytes": max(p.max_code_bytes for p in policies),
        "max_stdin_bytes": max(p.max_stdin_bytes for p in policies),
        "max_timeout_seconds": max(p.max_timeout_seconds for p in policies),
        "max_memory_mb": max(p.max_memory_mb for p in policies),
    }
    return {
        "type": "object",
        "properties": {
            "code": {
                "type": "string",
                "description": f"The program to run, UTF-8 source of at most {caps['max_code_bytes']} bytes.",
                "minLength": 1,
                "maxLength": caps["max_code_bytes"],
            },
            "language": {
                "type": "string",
                "enum": sandbox.languages,
                "default": "python",
                "description": "The runtime to run the code in.",
            },
            "stdin": {
                "type": ["string", "null"],
                "default": None,
                "maxLength": caps["max_stdin_bytes"],
                "description": "Text for the program's standard input; without it the program reads EOF.",
            },
            "timeout_seconds": {
                "type": ["number", "null"],
                "default": None,
                "exclusiveMinimum": 0,
                "maximum": caps["max_timeout_seconds"],
                "description": f"Wall-clock limit; default {defaults.default_timeout_seconds:g} s.",
            },
            "memory_mb": {
                "type": ["integer", "null"],
                "default": None,
                "minimum": 16,
                "maximum": caps["max_memory_mb"],
                "description": f"Memory limit, swap included; default {defaults.default_memory_mb} MiB.",
            },
        },
        "required": ["code"],
        "additionalProperties": False,
    }


def tool_description(sandbox: Sandbox) -> str:
    settings = sandbox.settings
    egress = [language for language in sandbox.languages if settings.policy(language).network == "egress"]
    network = (
        f"outbound internet access for {', '.join(egress)} (never the host or private networks)"
        if egress
        else "no network access"
    )
    return (
        "Run code in a fresh, isolated sandbox and return its output. Each call starts from a clean "
        "machine: nothing persists between calls, there is no access to the host's files, and "
        f"{network}. Languages: {', '.join(sandbox.languages)}. Python returns the repr of a final "
        "expression as return_value and has numpy, pandas and matplotlib (Agg). Read `status` "
        "(success, error, timeout, memory_limit, output_limit, killed, cancelled) to see how it ended."
    )


def build_tool(sandbox: Sandbox) -> types.Tool:
    return types.Tool(
        name=TOOL_NAME,
        title="Execute code in a sandbox",
        description=tool_description(sandbox),
        input_schema=input_schema(sandbox),
        output_schema=ExecutionResult.model_json_schema(mode="serialization"),
        annotations=types.ToolAnnotations(
            title="Execute code in a sandbox",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=any(sandbox.settings.policy(lang).network != "none" for lang in sandbox.languages),
        ),
    )


def build_server(sandbox: Sandbox) -> Server[Any]:
    """An MCP server offering `execute_code` over ``sandbox``, which the caller opens and closes."""
    tool = build_tool(sandbox)

    async def list_tools(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool])

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name != TOOL_NAME:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}; use {TOOL_NAME}")
        return await _call_execute(sandbox, ctx, params.arguments or {})

    return Server(
        "codomyrmex-sandbox",
        version=__version__,
        instructions=tool_description(sandbox),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def _call_execute(
    sandbox: Sandbox, ctx: ServerRequestContext[Any], arguments: dict[str, Any]
) -> types.CallToolResult:
    client = _client_name(ctx)
    # Always stream: the session sends nothing unless the caller gave a progress token, and an
    # in-process client's token is not visible in the request's metadata.
    timeout = arguments.get("timeout_seconds")
    language = arguments.get("language", "python")
    if isinstance(timeout, int | float):
        total = float(timeout)
    elif isinstance(language, str) and language in sandbox.runtimes:
        total = sandbox.settings.policy(language).default_timeout_seconds
    else:
        total = sandbox.settings.policy().default_timeout_seconds
    streamer = _ProgressStreamer(ctx, total)
    outcome: ExecutionResult | SandboxError
    async with anyio.create_task_group() as tg:
        tg.start_soon(streamer.run)
        try:
            outcome = await sandbox.execute_arguments(arguments, on_output=streamer.add, client=client)
        except SandboxError as exc:  # caught here: a task group would wrap it in a group
            outcome = exc
        finally:
            with anyio.CancelScope(shield=True):
                await streamer.close()
            tg.cancel_scope.cancel()
    if isinstance(outcome, SandboxError):
        get_logger("codomyrmex_sandbox.server").info("call_not_run", error=str(outcome), client=client)
        return types.CallToolResult(content=[types.TextContent(type="text", text=str(outcome))], is_error=True)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=outcome.render_text())],
        structured_content=outcome.model_dump(mode="json"),
        is_error=False,
    )


def _client_name(ctx: ServerRequestContext[Any]) -> str | None:
    info: Any = None
    params = ctx.session.client_params
    if params is not None:
        info = params.client_info
    elif ctx.meta:
        info = ctx.meta.get(types.CLIENT_INFO_META_KEY)
    if info is None:
        return None
    name = info.get("name") if isinstance(info, dict) else getattr(info, "name", None)
    version = info.get("version") if isinstance(info, dict) else getattr(info, "version", None)
    return f"{name} {version}".strip()[:200] if name else None


class _ProgressStreamer:
    """Turns output into ``notifications/progress``: at most one every 100 ms, each bounded in size.

    ``progress`` is the elapsed seconds and ``total`` the timeout; ``message`` carries the new text,
    stderr lines marked ``[stderr]``. Output beyond the backlog bound is summarised, not queued:
    the final result carries the full (capped) output anyway.
    """

    def __init__(self, ctx: ServerRequestContext[Any], total: float) -> None:
        self._ctx = ctx
        self._total = total
        self._start = time.monotonic()
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._wake = anyio.Event()

    async def add(self, stream: StreamName, text: str) -> None:
        if self._size >= STREAM_BACKLOG_CHARS:
            self._dropped += len(text)
            return
        if stream == "stderr":
            text = "".join(f"[stderr] {line}" for line in text.splitlines(keepends=True))
        self._parts.append(text)
        self._size += len(text)
        self._wake.set()

    async def run(self) -> None:
        """Send until cancelled (the caller cancels it once the execution ended)."""
        while True:
            with anyio.move_on_after(1.0):  # a heartbeat each second, output or not
                await self._wake.wait()
            await self._flush()
            await anyio.sleep(STREAM_INTERVAL_SECONDS)

    async def close(self) -> None:
        """Send what is left."""
        if self._parts or self._dropped:
            await self._flush()

    async def _flush(self) -> None:
        self._wake = anyio.Event()
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        offset = 0
        while True:  # slices by index: the backlog is never copied again per message
            message = text[offset : offset + STREAM_MESSAGE_CHARS]
            offset += STREAM_MESSAGE_CHARS
            last = offset >= len(text)
            if self._dropped and last:
                message += f"\n[{self._dropped} characters not streamed; the result has them]\n"
                self._dropped = 0
            elapsed = round(time.monotonic() - self._start, 3)
            try:
                await self._ctx.session.report_progress(elapsed, self._total, message or None)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the client went away; the call's own cancellation follows
            if last:
                return


class _StdinLines(anyio.AsyncFile[str]):
    """stdin, line by line, read in a worker thread that a cancellation may abandon.

    The SDK's default reader cannot be abandoned, so a shutdown on SIGTERM would wait until the
    client sent another line or closed the pipe, keeping sandboxes (and warm ones) alive meanwhile.
    It also sets aside requests whose id is not a valid JSON-RPC id, which the SDK would take for
    notifications and never answer, and lines longer than ``max_chars``, which are skipped without
    being kept in memory; `_answer_rejected` answers both.
    """

    def __init__(self, fp: Any, max_chars: int) -> None:  # noqa: ANN401 - a text file
        super().__init__(fp)
        self.max_chars = max_chars
        self.rejected_send, self.rejected = anyio.create_memory_object_stream[types.JSONRPCError](64)

    async def readline(self) -> str:
        while True:
            line, invalid_id = await anyio.to_thread.run_sync(self._read_line, abandon_on_cancel=True)
            if len(line) >= self.max_chars and not line.endswith("\n"):
                await self._reject_oversized(line)
                continue
            if not invalid_id:
                return line
            error = types.ErrorData(
                code=types.INVALID_REQUEST, message="invalid request: id must be a string or a number"
            )
            await self.rejected_send.send(types.JSONRPCError(jsonrpc="2.0", id=None, error=error))

    def _read_line(self) -> tuple[str, bool]:
        """Worker thread: one line of at most ``max_chars``, and whether its id is invalid.

        The id check parses the line, so it runs here too: a large line never costs the event loop.
        """
        line: str = self.wrapped.readline(self.max_chars)
        complete = line.endswith("\n") or len(line) < self.max_chars
        return line, complete and _has_invalid_id(line)

    async def _reject_oversized(self, head: str) -> None:
        """Skip the rest of an over-long line, a bounded piece at a time, and answer it with an error."""
        skipped = len(head)
        while True:
            piece: str = await anyio.to_thread.run_sync(self.wrapped.readline, SKIP_PIECE_CHARS, abandon_on_cancel=True)
            skipped += len(piece)
            if not piece or piece.endswith("\n"):
                break
        get_logger("codomyrmex_sandbox.server").warning("message_too_large", characters=skipped, limit=self.max_chars)
        error = types.ErrorData(
            code=types.INVALID_REQUEST,
            message=(
                f"invalid request: the message is {skipped} characters long, over this server's limit of "
                f"{self.max_chars}; send less code or stdin (the limits are in the tool's input schema)"
            ),
        )
        await self.rejected_send.send(types.JSONRPCError(jsonrpc="2.0", id=_leading_id(head), error=error))


# The id of a request, as the first key that looks like one in the start of a line. Bounded
# repetitions and a bounded input keep it linear; an id it cannot find is answered as null.
_LEADING_ID = re.compile(r'"id"\s{0,16}:\s{0,16}(?:"((?:[^"\\]|\\.){0,256})"|(-?\d{1,19})(?![\d.eE]))')
_ID_SEARCH_CHARS = 4096


def _leading_id(head: str) -> str | int | None:
    match = _LEADING_ID.search(head[:_ID_SEARCH_CHARS])
    if match is None:
        return None
    if match.group(2) is not None:
        return int(match.group(2))
    try:
        value = json.loads(f'"{match.group(1)}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def max_message_chars(sandbox: Sandbox) -> int:
    """The longest stdin line the server reads: a few times the largest valid request.

    JSON may spell each byte of code or stdin as a six-character escape, so the bound is six times
    the largest code plus stdin that any language accepts, and room for the rest of the message.
    """
    policies = [sandbox.settings.policy(language) for language in sandbox.languages]
    largest = max(p.max_code_bytes + p.max_stdin_bytes for p in policies)
    return 6 * largest + MESSAGE_OVERHEAD_CHARS


def _has_invalid_id(line: str) -> bool:
    if '"id"' not in line and "\\u" not in line:  # the key may be spelled with escapes
        return False
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return False  # the SDK answers what does not parse
    if not isinstance(data, dict) or "id" not in data:
        return False
    value = data["id"]
    return isinstance(value, bool) or not isinstance(value, str | int)


async def serve_stdio(sandbox: Sandbox) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin, or the calling task is cancelled."""
    server = build_server(sandbox)
    # A duplicate of fd 0: closing this reader never closes the process's own stdin.
    stdin = _StdinLines(
        open(os.dup(0), encoding="utf-8", errors="replace", closefd=True),  # noqa: SIM115, PTH123, ASYNC230 - a dup, never blocks
        max_message_chars(sandbox),
    )
    async with stdio_server(stdin=stdin) as (read_stream, write_stream), anyio.create_task_group() as tg:
        # Lines that are not JSON-RPC messages reach the server as exceptions, which the SDK drops
        # without an answer: a client waiting on that id would wait forever. Answer them here.
        checked_send, checked_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        tg.start_soon(_answer_malformed, read_stream, checked_send, write_stream)
        tg.start_soon(_answer_rejected, stdin.rejected, write_stream)
        await server.run(checked_receive, write_stream, server.create_initialization_options())
        tg.cancel_scope.cancel()


async def _answer_malformed(
    incoming: MemoryObjectReceiveStream[SessionMessage | Exception],
    forward: MemoryObjectSendStream[SessionMessage | Exception],
    outgoing: MemoryObjectSendStream[SessionMessage],
) -> None:
    async with incoming, forward:
        async for item in incoming:
            if not isinstance(item, Exception):
                await forward.send(item)
                continue
            request_id, code, message = _describe_malformed(item)
            get_logger("codomyrmex_sandbox.server").info("malformed_message", code=code, error=message[:200])
            error = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))
            await outgoing.send(SessionMessage(error))


async def _answer_rejected(
    rejected: MemoryObjectReceiveStream[types.JSONRPCError], outgoing: MemoryObjectSendStream[SessionMessage]
) -> None:
    async with rejected:
        async for error in rejected:
            await outgoing.send(SessionMessage(error))


def _describe_malformed(exc: Exception) -> tuple[str | int | None, int, str]:
    """The id to answer (when the line carried one), the JSON-RPC error code, and a message."""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else []
    if errors and errors[0]["type"] == "json_invalid":
        # Python's own parser accepts what the SDK's strict one refuses (lone surrogates above all):
        # it recovers the id, so that the client waiting on it gets its answer.
        try:
            data = json.loads(errors[0]["input"])
        except (TypeError, ValueError, RecursionError):
            return None, types.PARSE_ERROR, f"parse error: {errors[0]['msg']}"
        request_id = _lenient_id([data])
        return request_id, types.INVALID_PARAMS, f"invalid params: {errors[0]['msg']}; send valid UTF-8 text"
    request_id = _lenient_id([error.get("input") for error in errors])
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3]) or str(exc)
    return request_id, types.INVALID_REQUEST, f"invalid request: {summary[:500]}"


def _lenient_id(inputs: list[Any]) -> str | int | None:
    """The id of the message that failed validation, when it is a valid id at all."""
    for data in inputs:
        value = data.get("id") if isinstance(data, dict) else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            return value
    return None

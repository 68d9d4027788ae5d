"""The stdio transport, hardened: every line a client sends is answered, and none can exhaust memory.

The SDK's stdio transport trusts its client. Here stdin is read through `_StdinLines`, a reader
that a shutdown can abandon, that skips (unread, a bounded piece at a time) a line longer than
`max_message_chars`, and that sets aside a request whose id is not a valid JSON-RPC id; each of
these, and every line that is not a JSON-RPC message at all, is answered with a JSON-RPC error
carrying the request's id where one can be found, so that a client waiting on it is never left
waiting. Everything else goes on to the MCP server of `codomyrmex_sandbox.server` unchanged.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.server import build_server
from codomyrmex_sandbox.service import Sandbox

MESSAGE_OVERHEAD_CHARS = 65_536  # everything in a request besides its code and stdin
SKIP_PIECE_CHARS = 1 << 20  # the rest of an over-long line is read and dropped this much at a time
_LOGGER = "codomyrmex_sandbox.stdio"


async def serve_stdio(sandbox: Sandbox) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin, or the calling task is cancelled."""
    server = build_server(sandbox)
    # A duplicate of fd 0: closing this reader never closes the process's own stdin.
    stdin = _StdinLines(
        open(os.dup(0), encoding="utf-8", errors="replace", closefd=True),  # noqa: SIM115, PTH123, ASYNC230 - a dup, never blocks
        max_message_chars(sandbox),
    )
    async with stdio_server(stdin=stdin) as (read_stream, stdout), anyio.create_task_group() as tg:
        # Everything bound for stdout passes the gate, which drops it once stdin has closed.
        write_stream, gated = anyio.create_memory_object_stream[SessionMessage](0)
        tg.start_soon(_gate, gated, stdout, stdin)
        # Lines that are not JSON-RPC messages reach the server as exceptions, which the SDK drops
        # without an answer: a client waiting on that id would wait forever. Answer them here.
        checked_send, checked_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        tg.start_soon(_answer_malformed, read_stream, checked_send, write_stream.clone())
        tg.start_soon(_answer_rejected, stdin.rejected, write_stream.clone())
        async with write_stream:
            await server.run(checked_receive, write_stream.clone(), server.create_initialization_options())
        tg.cancel_scope.cancel()


async def _gate(
    outgoing: MemoryObjectReceiveStream[SessionMessage],
    stdout: MemoryObjectSendStream[SessionMessage],
    stdin: _StdinLines,
) -> None:
    """Pass messages to stdout until stdin closes; then drop them.

    A client closes stdin when it is done (mcp 1.x does so on exit, then stops reading): the SDK
    would still answer the calls in flight with "Connection closed" errors, and every write to a
    pipe nobody reads breaks the client's reader or blocks the server. Once stdin has closed the
    calls in flight are cancelled, their sandboxes removed, and the server exits without a word.
    """
    dropped = 0
    async with outgoing, stdout:
        async for message in outgoing:
            if stdin.closed:
                dropped += 1
                continue
            try:
                await stdout.send(message)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                dropped += 1
    if dropped:
        get_logger(_LOGGER).info("messages_not_sent", count=dropped, reason="stdin closed")


FILE_OVERHEAD_CHARS = 8 * 1024  # an uploaded file's path (1,024 bytes, escaped) and field names


def max_message_chars(sandbox: Sandbox) -> int:
    """The longest stdin line the server reads: a few times the largest valid request.

    JSON may spell each byte of code or stdin as a six-character escape, so the bound is six times
    the largest code plus stdin that any language accepts. Uploads count as base64, four characters
    for three bytes (text files at their cap must come unescaped or as base64: at six characters a
    byte, 16 MiB of them would need a bound that also admits the 100 MB lines this exists to
    refuse), with room for each file's path and fields, and for the rest of the message.
    """
    policies = sandbox.policies.values()
    largest = max(p.max_code_bytes + p.max_stdin_bytes for p in policies)
    uploads = max(4 * -(-p.max_input_bytes // 3) + p.max_input_files * FILE_OVERHEAD_CHARS for p in policies)
    return 6 * largest + uploads + MESSAGE_OVERHEAD_CHARS


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
        self.closed = False  # set once stdin has reached its end (see `_gate`)
        self.rejected_send, self.rejected = anyio.create_memory_object_stream[types.JSONRPCError](64)

    async def readline(self) -> str:
        while True:
            line, invalid_id = await anyio.to_thread.run_sync(self._read_line, abandon_on_cancel=True)
            if not line:  # the client closed stdin: from now on nothing is written to stdout
                self.closed = True
                return line
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
        get_logger(_LOGGER).warning("message_too_large", characters=skipped, limit=self.max_chars)
        error = types.ErrorData(
            code=types.INVALID_REQUEST,
            message=(
                f"invalid request: the message is {skipped} characters long, over this server's limit of "
                f"{self.max_chars}; send less code, stdin or files, and large files as base64 (the limits are "
                "in the tool's input schema)"
            ),
        )
        await self.rejected_send.send(types.JSONRPCError(jsonrpc="2.0", id=_leading_id(head), error=error))


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
            get_logger(_LOGGER).info("malformed_message", code=code, error=message[:200])
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

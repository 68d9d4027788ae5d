"""The MCP adapter: the `execute_code` tool over any MCP transport.

It knows nothing about Docker: it turns tool arguments into a request for the `Sandbox`
service, progress tokens into streamed output, and results or errors into MCP results. A program
that ran is a normal result whatever its status; a call that never ran is ``isError: true`` with a
message that says what to do. The input schema is generated from the request model (`schema`);
the stdio transport, hardened against what a client may send, is in `stdio`.
"""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.excerpt import excerpt_is_cheap
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult, request_from_arguments
from codomyrmex_sandbox.output import StreamName
from codomyrmex_sandbox.schema import input_schema
from codomyrmex_sandbox.service import Sandbox
from codomyrmex_sandbox.workspace import IMAGE_TYPES

TOOL_NAME = "execute_code"
STREAM_INTERVAL_SECONDS = 0.1
STREAM_MESSAGE_CHARS = 16_384
STREAM_BACKLOG_CHARS = 65_536
CONTENT_OFF_LOOP_BYTES = 256 * 1024


def tool_description(sandbox: Sandbox) -> str:
    egress = [language for language in sandbox.languages if sandbox.policies[language].network == "egress"]
    network = (
        f"outbound internet access for {', '.join(egress)} (never the host or private networks)"
        if egress
        else "no network access"
    )
    return (
        "Run code in a fresh, isolated sandbox and return its output. Each call starts from a clean "
        "machine: nothing persists between calls, there is no access to the host's files, and "
        f"{network}. Languages: {', '.join(sandbox.languages)}. Python returns the repr of a final "
        "expression as return_value and has numpy, pandas, matplotlib and pytest. Pass `files` to put data "
        "or a project in the working directory (/sandbox); files the program creates or changes there "
        "come back in the result, and Python's matplotlib figures (plt.show() or left open) come back as "
        "PNG images. Read `status` "
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
            open_world_hint=any(policy.network != "none" for policy in sandbox.policies.values()),
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
    request, total = _validated(sandbox, arguments)
    streamer = _ProgressStreamer(ctx, total)
    outcome: ExecutionResult | SandboxError
    async with anyio.create_task_group() as tg:
        tg.start_soon(streamer.run)
        try:
            if request is None:  # the service refuses it, audits the refusal, and says why
                outcome = await sandbox.execute_arguments(arguments, on_output=streamer.add, client=client)
            else:
                outcome = await sandbox.execute_request(request, on_output=streamer.add, client=client)
        except SandboxError as exc:  # caught here: a task group would wrap it in a group
            outcome = exc
        finally:
            with anyio.CancelScope(shield=True):
                await streamer.close()
            tg.cancel_scope.cancel()
    if isinstance(outcome, SandboxError):
        get_logger("codomyrmex_sandbox.server").info("call_not_run", error=str(outcome), client=client)
        return types.CallToolResult(content=[types.TextContent(type="text", text=str(outcome))], is_error=True)
    # Sized for a model: each stream's head and tail within result_stream_bytes, the text block
    # rendered from the same excerpts. Counting a large non-ASCII text's bytes goes off the loop.
    limit = sandbox.settings.result_stream_bytes
    if excerpt_is_cheap(outcome.stdout, outcome.stderr, outcome.return_value):
        shown = outcome.for_model(limit)
    else:
        shown = await anyio.to_thread.run_sync(outcome.for_model, limit)
    # Returned files and figures travel as content blocks, never in the structured content: base64
    # of megabytes is built in a worker thread.
    which = sandbox.settings.result_content_blocks
    returned = sum(entry.size_bytes for entry in (*outcome.files, *outcome.figures) if entry.content is not None)
    if which == "none":
        blocks = []
    elif returned > CONTENT_OFF_LOOP_BYTES:
        blocks = await anyio.to_thread.run_sync(content_blocks, outcome, which == "images")
    else:
        blocks = content_blocks(outcome, images_only=which == "images")
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=shown.render_text()), *blocks],
        structured_content=shown.model_dump(mode="json"),
        is_error=False,
    )


def content_blocks(result: ExecutionResult, images_only: bool = False) -> list[types.ContentBlock]:  # noqa: FBT001, FBT002
    """One block per returned figure and file: an image for PNG, JPEG, GIF and WebP content, else
    (unless ``images_only``) an embedded resource at ``sandbox://executions/{execution_id}/files/{path}``
    (text or base64 blob). The operator chooses with ``result_content_blocks``."""
    blocks: list[types.ContentBlock] = []
    for entry in (*result.figures, *result.files):
        if entry.content is None:
            continue
        if entry.mime_type in IMAGE_TYPES:
            data = base64.b64encode(entry.content).decode("ascii")
            blocks.append(types.ImageContent(type="image", data=data, mime_type=entry.mime_type))
            continue
        if images_only:
            continue
        uri = f"sandbox://executions/{result.execution_id}/files/{quote(entry.path, safe='/')}"
        resource: types.TextResourceContents | types.BlobResourceContents
        if entry.text is not None:
            resource = types.TextResourceContents(uri=uri, mime_type=entry.mime_type, text=entry.text)
        else:
            blob = base64.b64encode(entry.content).decode("ascii")
            resource = types.BlobResourceContents(uri=uri, mime_type=entry.mime_type, blob=blob)
        blocks.append(types.EmbeddedResource(type="resource", resource=resource))
    return blocks


def _validated(sandbox: Sandbox, arguments: dict[str, Any]) -> tuple[ExecutionRequest | None, float | None]:
    """The request (validated once, here) and the timeout progress counts up to; (None, None) when
    the service will refuse the call, which then streams nothing."""
    try:
        request = request_from_arguments(arguments)
        return request, sandbox.effective_limits(request).timeout_seconds
    except SandboxError:
        return None, None


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
    the final result carries the output anyway (each stream's head and tail when it is long).
    """

    def __init__(self, ctx: ServerRequestContext[Any], total: float | None) -> None:
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
                message += f"\n[{self._dropped} characters not streamed; the result has the head and the tail]\n"
                self._dropped = 0
            elapsed = round(time.monotonic() - self._start, 3)
            try:
                await self._ctx.session.report_progress(elapsed, self._total, message or None)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the client went away; the call's own cancellation follows
            if last:
                return

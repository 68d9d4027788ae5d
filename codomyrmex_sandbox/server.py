"""The MCP adapter: the `execute_code` tool (and the session tools) over any MCP transport.

It knows nothing about Docker: it turns tool arguments into a request for the `Sandbox`
service, progress tokens into streamed output, and results or errors into MCP results. A program
that ran is a normal result whatever its status; a call that never ran is ``isError: true`` with a
message that says what to do. The input schema is generated from the request model (`schema`);
the stdio transport, hardened against what a client may send, is in `stdio`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.excerpt import excerpt_is_cheap
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import (
    ClosedSession,
    CloseSessionRequest,
    CreatedSession,
    CreateSessionRequest,
    ExecutionRequest,
    ExecutionResult,
    ListSessionsRequest,
    SessionList,
    request_from_arguments,
    validate_arguments,
)
from codomyrmex_sandbox.output import StreamName
from codomyrmex_sandbox.principals import SCOPE_KEY, Principal
from codomyrmex_sandbox.schema import input_schema
from codomyrmex_sandbox.service import Sandbox
from codomyrmex_sandbox.workspace import IMAGE_TYPES

TOOL_NAME = "execute_code"
CREATE_SESSION = "create_session"
CLOSE_SESSION = "close_session"
LIST_SESSIONS = "list_sessions"
OWNER = "owner"  # the lifespan context's key for the connection's owner token
STREAM_INTERVAL_SECONDS = 0.1
STREAM_MESSAGE_CHARS = 16_384
STREAM_BACKLOG_CHARS = 65_536
CONTENT_OFF_LOOP_BYTES = 256 * 1024
STREAM_CLOSE_SECONDS = 5.0


def tool_description(sandbox: Sandbox) -> str:
    egress = [language for language in sandbox.languages if sandbox.policies[language].network == "egress"]
    network = (
        f"outbound internet access for {', '.join(egress)} (never the host or private networks)"
        if egress
        else "no network access"
    )
    persistence = (
        "nothing persists between calls unless you pass the session_id of a session made with create_session "
        "(then variables, imports, functions, the current directory and files carry over, and the result's "
        "session.state says whether they still do)"
        if sandbox.settings.max_sessions > 0
        else "nothing persists between calls"
    )
    return (
        "Run code in a fresh, isolated sandbox and return its output. Each call starts from a clean "
        f"machine: {persistence}; there is no access to the host's files, and "
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


def session_tools(sandbox: Sandbox) -> list[types.Tool]:
    """`create_session`, `close_session` and `list_sessions`; none on a server without sessions."""
    settings = sandbox.settings
    if settings.max_sessions == 0:
        return []
    idle, lifetime = settings.session_idle_timeout_seconds, settings.session_max_lifetime_seconds
    create = (
        "Start a session: one isolated sandbox whose interpreter keeps its state from call to call. Pass the "
        "returned session_id to execute_code: Python keeps its globals, imports and functions (and returns "
        "a final expression's repr), JavaScript its global scope (let/const/class/function), bash its variables, "
        "functions and current directory; files in /sandbox stay, and processes started in the background run "
        "until the session ends. Each result's session.state says whether the state is still there: a timeout, "
        "the memory or output limit, or the program exiting the interpreter ends the session (ended_reason "
        "says which), an error does not. Calls of a session run one at a time. A session ends after "
        f"idle_timeout_seconds without a call (default {idle:g} s) and at expires_at ({lifetime:g} s after "
        "creation) at the latest; close it with close_session when done. Only this client can use it."
    )
    return [
        _tool(
            sandbox, CREATE_SESSION, "Create a session", create, CreateSessionRequest, CreatedSession, idempotent=False
        ),
        _tool(
            sandbox,
            CLOSE_SESSION,
            "Close a session",
            "End one of your sessions (after its running call, if any) and remove its sandbox; returns how "
            "many calls it ran and its resource usage.",
            CloseSessionRequest,
            ClosedSession,
            idempotent=False,
            destructive=True,
        ),
        _tool(
            sandbox,
            LIST_SESSIONS,
            "List sessions",
            "List your open sessions: id, language, calls so far, when each ends if left idle, and its hard end.",
            ListSessionsRequest,
            SessionList,
            idempotent=True,
            read_only=True,
        ),
    ]


def _tool(  # noqa: PLR0917 - one tool's parts, in the order a Tool lists them
    sandbox: Sandbox,
    name: str,
    title: str,
    description: str,
    arguments: type[BaseModel],
    result: type[BaseModel],
    *,
    idempotent: bool,
    read_only: bool = False,
    destructive: bool = False,
) -> types.Tool:
    return types.Tool(
        name=name,
        title=title,
        description=description,
        input_schema=input_schema(sandbox, arguments),
        output_schema=result.model_json_schema(mode="serialization"),
        annotations=types.ToolAnnotations(
            title=title,
            read_only_hint=read_only,
            destructive_hint=destructive,
            idempotent_hint=idempotent,
            open_world_hint=False,
        ),
    )


def build_server(sandbox: Sandbox) -> Server[Any]:
    """An MCP server offering `execute_code` (and the session tools) over ``sandbox``, which the
    caller opens and closes.

    Sessions belong to the connection that created them: each connection gets an owner token of its
    own (random, from the server's lifespan, which the SDK enters once per connection), which no
    other connection can present; when the connection ends, so do its sessions. Over HTTP (a request
    in the context) they belong to the request's principal, which the HTTP app put in the scope.
    """
    tools = [build_tool(sandbox), *session_tools(sandbox)]
    names = [tool.name for tool in tools]

    @asynccontextmanager
    async def connection(_server: Server[dict[str, str]]) -> AsyncIterator[dict[str, str]]:
        # Entered once per connection (a stdio client, an in-process client): its sessions are its
        # own, and end when it goes.
        owner = "connection:" + secrets.token_hex(16)
        try:
            yield {OWNER: owner}
        finally:
            with anyio.CancelScope(shield=True):
                await sandbox.close_sessions_of(owner, "disconnected")

    def caller_of(ctx: ServerRequestContext[Any]) -> tuple[str, Principal | None]:
        """Who owns the sessions a call may use, and its principal (over HTTP only)."""
        if ctx.request is None:  # stdio, in-process
            owner: str = ctx.lifespan_context[OWNER]
            return owner, None
        scope = getattr(ctx.request, "scope", None)
        principal = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
        if not isinstance(principal, Principal):
            # An HTTP app without our authentication in front: refuse rather than share state.
            raise MCPError(
                code=types.INVALID_REQUEST,
                message="this HTTP endpoint names no principal; serve it with "
                "`codomyrmex-sandbox serve --transport http`",
            )
        return principal.key, principal

    async def list_tools(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        arguments = params.arguments or {}
        if params.name not in names:
            raise MCPError(
                code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}; use one of: {', '.join(names)}"
            )
        owner, principal = caller_of(ctx)
        if params.name == TOOL_NAME:
            return await _call_execute(sandbox, ctx, arguments, owner, principal)
        return await _call_session_tool(sandbox, ctx, params.name, arguments, owner, principal)

    return Server(
        "codomyrmex-sandbox",
        version=__version__,
        instructions=tool_description(sandbox),
        lifespan=connection,
        # Over HTTP (protocol 2026-07-28) the SDK checks each call's Mcp-Param-* headers against the
        # tool's schema; without this it runs tools/list (20 KB of JSON) for every call.
        get_tool_input_schema={tool.name: tool.input_schema for tool in tools}.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def _call_session_tool(  # noqa: PLR0917 - the call and who makes it
    sandbox: Sandbox,
    ctx: ServerRequestContext[Any],
    name: str,
    arguments: dict[str, Any],
    owner: str,
    principal: Principal | None,
) -> types.CallToolResult:
    client = _client_name(ctx)
    outcome: BaseModel
    try:
        if name == CREATE_SESSION:
            outcome = await sandbox.create_session_arguments(arguments, client=client, owner=owner, principal=principal)
        elif name == CLOSE_SESSION:
            outcome = await sandbox.close_session_arguments(arguments, owner=owner, client=client, principal=principal)
        else:
            validate_arguments(ListSessionsRequest, arguments)
            outcome = sandbox.list_sessions(owner=owner)
    except SandboxError as exc:
        get_logger("codomyrmex_sandbox.server").info("call_not_run", tool=name, error=str(exc), client=client)
        return types.CallToolResult(content=[types.TextContent(type="text", text=str(exc))], is_error=True)
    structured = outcome.model_dump(mode="json")
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=_session_text(name, structured))],
        structured_content=structured,
        is_error=False,
    )


def _session_text(name: str, structured: dict[str, Any]) -> str:
    """A session tool's result as a model reads it: one line of what matters, then the JSON."""
    if name == CREATE_SESSION:
        head = (
            f"session {structured['session_id']} open ({structured['runtime']}); pass it as session_id to "
            f"execute_code. It ends after {structured['idle_timeout_seconds']:g} s idle, or at "
            f"{structured['expires_at']}."
        )
    elif name == CLOSE_SESSION:
        head = f"session {structured['session_id']} closed after {structured['calls']} calls."
    else:
        head = f"{len(structured['sessions'])} open sessions."
    return head + "\n" + json.dumps(structured, indent=1)


async def _call_execute(
    sandbox: Sandbox, ctx: ServerRequestContext[Any], arguments: dict[str, Any], owner: str, principal: Principal | None
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
                outcome = await sandbox.execute_arguments(
                    arguments, on_output=streamer.add, client=client, owner=owner, principal=principal
                )
            else:
                outcome = await sandbox.execute_request(
                    request, on_output=streamer.add, client=client, owner=owner, principal=principal
                )
        except SandboxError as exc:  # caught here: a task group would wrap it in a group
            outcome = exc
        finally:
            # Bounded: a client that never reads its event stream cannot hold the call here.
            with anyio.move_on_after(STREAM_CLOSE_SECONDS, shield=True):
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

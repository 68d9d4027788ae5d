"""Remote use: MCP's streamable HTTP transport at ``/mcp``, with bearer authentication, health,
readiness, metrics and a graceful stop (``serve --transport http``; contract in
MCP_TOOL_SPECIFICATION.md, "Remote use").

The MCP side is the SDK's own `StreamableHTTPSessionManager` (stateful: ``Mcp-Session-Id``, an
event stream per call, which carries the progress notifications), served by uvicorn. In front of
it, outermost first:

1. the Origin check: a request whose ``Origin`` is present and not in `http_allowed_origins` gets
   403 (DNS rebinding: a web page that reaches a loopback server through a name it controls);
2. authentication, with the SDK's building blocks: `BearerAuthBackend` over `auth.Authenticator`
   sets the request's user; `RequireAuthMiddleware` answers 401 with ``WWW-Authenticate: Bearer
   error=..., resource_metadata=...`` for ``/mcp`` (and ``/metrics`` unless `metrics_public`);
   the request's `Principal` goes into the ASGI scope, where the MCP adapter reads it;
3. the body bound: 413 as soon as a body is declared or seen to be larger than
   `http_max_body_bytes` (never read whole), 408 when it has not arrived within
   `http_request_timeout_seconds`; no execution slot is taken before the body is complete.

`/healthz` (the process serves) and `/readyz` (the engine answers and every runtime image is
there; 503 with a JSON reason, which names no setting) need no token.

On SIGTERM (or SIGINT) the server drains: it stops listening, refuses new and queued calls as busy
(`ShuttingDownError`), lets running calls finish for `shutdown_grace_seconds`, then stops serving;
the calls still running are cancelled (their sandboxes killed), the Sandbox removes every sandbox,
and the process exits 0. A second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import uvicorn
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.auth import Authenticator, PrincipalToken, is_loopback
from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.metrics import CONTENT_TYPE, Metrics
from codomyrmex_sandbox.principals import ANONYMOUS, SCOPE_KEY
from codomyrmex_sandbox.server import build_server
from codomyrmex_sandbox.service import Sandbox
from codomyrmex_sandbox.settings import Settings

MCP_PATH = "/mcp"
WELL_KNOWN = "/.well-known/oauth-protected-resource"
READY_CACHE_SECONDS = 1.0  # probes from load balancers (and anyone) cost the engine at most this often
MCP_SESSIONS = 4096  # streamable HTTP sessions open at once (each is a few objects; sandboxes are bounded apart)
MCP_SESSION_IDLE_SECONDS = 30 * 60
LOGGER = "codomyrmex_sandbox.http"
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
LINGER_SECONDS = 2.0  # after a refusal, how long the rest of a body is read and dropped
LINGER_BYTES = 64 * 1024 * 1024
DRAIN_LINGER_SECONDS = 1.0  # after the last running call, within the grace


def check_http_settings(settings: Settings) -> None:
    """Refuse a configuration that would serve code execution to anyone who can connect."""
    loopback = is_loopback(settings.http_host)
    if settings.insecure_no_auth:
        if not loopback:
            raise ConfigurationError(
                f"--insecure-no-auth (insecure_no_auth) is for loopback development only; http_host "
                f"{settings.http_host!r} is not a loopback address. Configure auth_tokens_file (make a token with "
                "`codomyrmex-sandbox auth new-token NAME`) or a JWT issuer (auth_jwt_issuer, auth_jwt_audience, "
                "auth_jwks_url)."
            )
        return
    if not settings.auth_configured:
        where = "a loopback address" if loopback else f"{settings.http_host!r}, which is not a loopback address"
        raise ConfigurationError(
            f"refusing to serve HTTP on {where} without authentication: anyone who can connect could run code. "
            "Set auth_tokens_file (CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE; make a token with `codomyrmex-sandbox auth "
            "new-token NAME`) or a JWT issuer (auth_jwt_issuer, auth_jwt_audience, auth_jwks_url); for development "
            "on 127.0.0.1 only, pass --insecure-no-auth."
        )


def public_url(settings: Settings, port: int) -> str:
    """The MCP endpoint's URL as clients reach it (the resource that tokens are for)."""
    if settings.http_public_url is not None:
        return settings.http_public_url
    return local_url(settings.http_host, port)


def local_url(host: str, port: int) -> str:
    """The MCP endpoint at ``host:port`` (an IPv6 address in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{MCP_PATH}"


def build_app(sandbox: Sandbox, *, port: int | None = None) -> Starlette:
    """The ASGI app: ``/mcp`` and the operational routes, for an open ``sandbox``."""
    settings = sandbox.settings
    metrics = sandbox.metrics
    max_body = settings.max_body_bytes()
    manager = StreamableHTTPSessionManager(
        app=build_server(sandbox),
        # Origin is checked in front (for every route); Host is left to the proxy or the operator.
        security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        max_request_body_size=max_body,
        session_idle_timeout=MCP_SESSION_IDLE_SECONDS,
        max_sessions=MCP_SESSIONS,
    )
    resource = public_url(settings, port if port is not None else settings.http_port)
    metadata_url = str(build_resource_metadata_url(AnyHttpUrl(resource)))
    authenticator = Authenticator.from_settings(settings) if not settings.insecure_no_auth else None

    def guarded(app: ASGIApp) -> ASGIApp:
        if authenticator is None:
            return _Principal(app, None, metrics)
        return _Principal(app, RequireAuthMiddleware(app, [], AnyHttpUrl(metadata_url)), metrics)

    mcp = guarded(_BodyLimit(manager.handle_request, max_body, settings.http_request_timeout_seconds, metrics))
    routes = [Route(MCP_PATH, endpoint=mcp), *_operational_routes(sandbox, guarded)]
    if authenticator is not None:
        routes += _metadata_routes(settings, resource, metadata_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    middleware = [Middleware(_OriginCheck, allowed=frozenset(settings.http_allowed_origins), metrics=metrics)]
    if authenticator is not None:
        middleware.append(Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(authenticator)))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _operational_routes(sandbox: Sandbox, guarded: Callable[[ASGIApp], ASGIApp]) -> list[Route]:
    metrics = sandbox.metrics
    readiness = _Readiness(sandbox)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def readyz(_request: Request) -> Response:
        report = await readiness.check()
        return JSONResponse(report, status_code=200 if report["ready"] else 503, headers={"Cache-Control": "no-store"})

    async def metrics_endpoint(_request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    public = sandbox.settings.metrics_public
    return [
        Route("/healthz", endpoint=healthz, methods=["GET"]),
        Route("/readyz", endpoint=readyz, methods=["GET"]),
        Route(
            "/metrics",
            endpoint=metrics_endpoint if public else guarded(request_response(metrics_endpoint)),
            methods=["GET"],
        ),
    ]


def _metadata_routes(settings: Settings, resource: str, metadata_url: str) -> list[Route]:
    """RFC 9728's document at /.well-known/oauth-protected-resource, and at the path-inserted form the
    MCP SDK's clients ask for first (the one ``WWW-Authenticate`` names)."""
    document = _resource_metadata(settings, resource)

    async def protected_resource(_request: Request) -> Response:
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=3600"})

    path = "/" + metadata_url.split("://", 1)[1].partition("/")[2]
    return [Route(where, endpoint=protected_resource, methods=["GET"]) for where in dict.fromkeys([WELL_KNOWN, path])]


def _resource_metadata(settings: Settings, resource: str) -> dict[str, Any]:
    """RFC 9728 metadata: this server is an OAuth protected resource that takes bearer tokens in the header."""
    document: dict[str, Any] = {
        "resource": resource,
        "bearer_methods_supported": ["header"],
        "resource_name": "codomyrmex-sandbox",
    }
    if settings.auth_jwt_issuer is not None:
        document["authorization_servers"] = [settings.auth_jwt_issuer]
    return document


class _Readiness:
    """`/readyz`'s answer, computed at most once per `READY_CACHE_SECONDS` whoever asks."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._lock = anyio.Lock()
        self._report: dict[str, Any] = {"ready": False}
        self._at = -float("inf")

    async def check(self) -> dict[str, Any]:
        if self._sandbox.draining:
            return {"ready": False, "reason": "shutting down"}
        async with self._lock:
            if time.monotonic() - self._at >= READY_CACHE_SECONDS:
                report = await self._sandbox.readiness()
                if not report["ready"] and report != self._report:
                    get_logger(LOGGER).warning("not_ready", **report)
                self._report, self._at = report, time.monotonic()
            return self._report


class _OriginCheck:
    def __init__(self, app: ASGIApp, allowed: frozenset[str], metrics: Metrics) -> None:
        self.app = app
        self.allowed = allowed
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            origin = Headers(scope=scope).get("origin")
            if origin is not None and origin not in self.allowed:
                self.metrics.refused("forbidden_origin")
                get_logger(LOGGER).info("origin_refused", origin=origin[:200], path=scope.get("path"))
                response = JSONResponse(
                    {
                        "error": "forbidden_origin",
                        "error_description": "this Origin is not allowed; the operator lists allowed origins "
                        "in http_allowed_origins",
                    },
                    status_code=403,
                )
                await _refuse(response, scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Principal:
    """Puts the request's principal in the scope, or lets ``refuse`` answer (401) when there is none.
    Without authentication (``refuse`` None, loopback development) everyone is `ANONYMOUS`."""

    def __init__(self, app: ASGIApp, refuse: ASGIApp | None, metrics: Metrics) -> None:
        self.app = app
        self.refuse = refuse
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.refuse is None:
            scope[SCOPE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        user = scope.get("user")
        token = user.access_token if isinstance(user, AuthenticatedUser) else None
        if not isinstance(token, PrincipalToken):
            self.metrics.refused("unauthorized")
            await _refuse(self.refuse, scope, receive, send)
            return
        scope[SCOPE_KEY] = token.principal
        await self.app(scope, receive, send)


class _BodyLimit:
    """Reads a request's body up to ``limit`` bytes within ``timeout`` seconds, then replays it to ``app``:
    413 as soon as it is larger (declared or seen), 408 when it is late."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout) as waited:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > self.limit:
                    await self._too_large(scope, receive, send)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        if waited.cancelled_caught:
            self.metrics.refused("request_timeout")
            response = _error_response(408, "request_timeout", f"the body did not arrive within {self.timeout:g} s")
            response.headers["Connection"] = "close"  # a client this slow gets no more time
            await response(scope, receive, send)
            return
        chunks.reverse()

        async def replay() -> Message:  # the chunks as they came: no copy of the whole body here
            if chunks:
                body = chunks.pop()
                return {"type": "http.request", "body": body, "more_body": bool(chunks)}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.refused("body_too_large")
        response = _error_response(
            413,
            "body_too_large",
            f"the request body is over {self.limit} bytes (http_max_body_bytes); send less code, stdin or files",
        )
        await _refuse(response, scope, receive, send)


def _error_response(status: int, error: str, description: str) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


async def _refuse(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Let ``app`` answer a refusal, then close the connection without losing the answer.

    The answer carries ``Connection: close`` and is sent whole, but its end is held back while what
    is left of the body is read and dropped, for a bounded time and size: uvicorn closes the
    connection when the answer ends, and closing with unread data in the socket makes the kernel
    reset the connection, so that the client would lose the answer it was sent (RFC 9112, 9.6).
    Reading on without a bound would let a refused client keep its connection forever.
    """
    held = False

    async def closing(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = [(key, value) for key, value in message.get("headers", []) if key.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            message, held = {**message, "more_body": True}, True
        await send(message)

    await app(scope, receive, closing)
    dropped = 0
    with anyio.move_on_after(LINGER_SECONDS):
        while dropped <= LINGER_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
    if held:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- serving ------------------------------------------------------------------------------------


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's line and headers.

    uvicorn closes an idle keep-alive connection, but not one that sent nothing, nor one stopped in
    the middle of its headers: a client without any token could hold every connection
    `http_max_connections` allows (slowloris), and every request, ``/healthz`` included, would get
    503 for as long as it liked. Here a connection that has not completed a request's headers
    within ``header_timeout`` seconds of opening, or of its previous answer, is closed.
    """

    header_timeout = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._reading_a_request():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._reading_a_request():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _reading_a_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._reading_a_request() and not self.transport.is_closing():
            get_logger(LOGGER).info("http_headers_late", timeout_seconds=self.header_timeout)
            self.transport.close()


def _protocol(header_timeout: float) -> type[H11Protocol]:
    return type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": header_timeout})


class _Server(uvicorn.Server):
    """uvicorn, with signals left to `serve_http` (which drains before it stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ConfigurationError that says what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (or http_port) or "
            "--host (http_host)"
        ) from exc
    return sock


async def serve_http(sandbox: Sandbox, *, on_listening: Callable[[str], Awaitable[None]] | None = None) -> None:
    """Serve MCP over HTTP until SIGTERM, SIGINT or SIGHUP, then drain (see the module docstring).

    ``sandbox`` is open; the caller closes it (removing every sandbox) once this returns.
    """
    settings = sandbox.settings
    check_http_settings(settings)
    sock = listen(settings.http_host, settings.http_port)
    port = int(sock.getsockname()[1])
    app = build_app(sandbox, port=port)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        ws="none",
        http=_protocol(settings.http_request_timeout_seconds),
        limit_concurrency=settings.http_max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=1,  # after the drain, what is left (idle event streams) is cut
    )
    server = _Server(config)
    logger = get_logger(LOGGER)

    grace = anyio.CancelScope()

    async def drain() -> None:
        logger.info("http_draining", grace_seconds=settings.shutdown_grace_seconds, running=sandbox.admission.running)
        for listener in server.servers:
            listener.close()  # stop accepting; connections already open are served
        sandbox.drain()
        with grace:
            grace.deadline = anyio.current_time() + settings.shutdown_grace_seconds
            await sandbox.admission.wait_idle()
            # The last results were just sent: a client reads one, and often asks once more on the same
            # connection (tools/list for the output schema). Open connections are served a moment
            # longer (tool calls are refused), so that the result is not lost with the connection.
            await anyio.sleep(DRAIN_LINGER_SECONDS)
        if sandbox.admission.running:
            logger.warning("http_grace_over", cancelling=sandbox.admission.running)
        # uvicorn closes the connections, then the app's lifespan ends the MCP sessions: calls still
        # running are cancelled (their sandboxes killed); the caller's Sandbox removes the rest.
        server.should_exit = True

    async with anyio.create_task_group() as tg:

        async def on_signals(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                task_status.started()
                async for signum in signals:
                    if sandbox.draining:  # a second signal: no more grace
                        grace.cancel()
                    else:
                        logger.info("http_signal", signal=signal.Signals(signum).name)
                        tg.start_soon(drain)

        await tg.start(on_signals)  # before anyone is told where to connect: a stop signal is never missed
        url = local_url(settings.http_host, port)
        logger.info(
            "http_listening",
            url=url,
            port=port,
            authentication=_auth_summary(settings),
            metrics_public=settings.metrics_public,
        )
        if on_listening is not None:
            await on_listening(url)
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            tg.cancel_scope.cancel()
    logger.info("http_stopped")


def _auth_summary(settings: Settings) -> str:
    if settings.insecure_no_auth:
        return "none (insecure, loopback only)"
    kinds = []
    if settings.auth_tokens_file is not None:
        kinds.append("bearer tokens")
    if settings.jwt_configured:
        kinds.append("JWT")
    return " + ".join(kinds)

"""The HTTP transport's ASGI app (http_server.py), in process over the fake backend: no socket, no
Docker. Requests go through httpx2's ASGI transport, or straight into the app where the test must
control how the body arrives (a body that never ends, a body that never comes). The app's lifespan
(the MCP session manager) is entered around each test, as uvicorn would.

Also here: the HTTP settings' rules (`check_http_settings`, the JWT trio, the derived defaults), the
CLI's ``auth new-token`` and its refusal to serve an unsafe configuration, and `caller_of` in
server.py seen through real MCP calls over the app: sessions belong to principals, and audit
records name them.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anyio import wait_all_tasks_blocked
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
from starlette.applications import Starlette
from starlette.routing import Route
from structlog.testing import capture_logs

from codomyrmex_sandbox import FakeBackend, FakeRun, Sandbox, Settings, __version__, cli, http_server
from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.http_server import build_app, check_http_settings
from codomyrmex_sandbox.models import MIB
from codomyrmex_sandbox.server import build_server
from codomyrmex_sandbox.tokens import new_token

PORT = 8000  # the port the app is told it serves on: it names the resource, nothing listens there
BASE = f"http://127.0.0.1:{PORT}"
METADATA = f"{BASE}/.well-known/oauth-protected-resource/mcp"
WWW_AUTHENTICATE = (
    f'Bearer error="invalid_token", error_description="Authentication required", resource_metadata="{METADATA}"'
)
EVERYWHERE = "0.0.0.0"  # noqa: S104 - the address the refusals are about; nothing binds here
WITHIN = 10.0  # seconds: the bound on anything that should take milliseconds
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
MADE_UP_ID = "s_" + "A" * 43  # the shape of a real session id, never issued
ISSUER = "https://issuer.example"
JWT_SETTINGS: dict[str, Any] = {
    "auth_jwt_issuer": ISSUER,
    "auth_jwt_audience": "sandbox",
    "auth_jwks_url": "https://issuer.example/jwks.json",  # never fetched: no JWT is presented here
}


class Interpreter:
    """The fake program: ``set k=v`` / ``get k`` (return value repr(v)) in the session's state,
    ``print text``, and ``wait`` (runs until the test opens `gate`)."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.waiting = 0

    async def __call__(self, run: FakeRun) -> int:
        for line in run.code.splitlines():
            word, _, rest = line.partition(" ")
            if word == "set":
                key, _, value = rest.partition("=")
                run.state[key] = value
            elif word == "get":
                run.return_value = repr(run.state.get(rest))
            elif word == "print":
                await run.write(rest + "\n")
            elif word == "wait":
                self.waiting += 1
                with anyio.fail_after(WITHIN):
                    await self.gate.wait()
        return 0


@dataclass
class Served:
    """An app over an open Sandbox, its lifespan entered."""

    sandbox: Sandbox
    backend: FakeBackend
    interpreter: Interpreter
    app: Starlette
    tokens: dict[str, str]

    def http(self, token: str | None = None, **headers: str) -> httpx2.AsyncClient:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=self.app), base_url=BASE, headers=headers, timeout=WITHIN
        )

    @asynccontextmanager
    async def mcp(self, token: str | None) -> AsyncIterator[Client]:
        """The MCP SDK's own client over streamable HTTP, into the app."""
        async with (
            self.http(token) as http,
            Client(streamable_http_client(f"{BASE}/mcp", http_client=http)) as client,
        ):
            yield client

    def refusals(self, reason: str) -> float:
        text = self.sandbox.metrics.render().decode()
        found = re.search(rf'^codomyrmex_sandbox_refusals_total\{{reason="{reason}"\}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


@asynccontextmanager
async def served(
    tmp_path: Path, *names: str, backend: FakeBackend | None = None, **settings: Any
) -> AsyncIterator[Served]:
    """An app whose tokens file admits ``names`` (none: no tokens file), over a fake-backend Sandbox."""
    tokens: dict[str, str] = {}
    if names:
        lines = []
        for name in names:
            tokens[name], line = new_token(name)
            lines.append(line)
        path = tmp_path / "tokens.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        settings["auth_tokens_file"] = path
    interpreter = Interpreter()
    backend = backend or FakeBackend(interpreter)
    async with Sandbox(Settings.load(backend="fake", **settings), backend=backend) as sandbox:
        app = build_app(sandbox, port=PORT)
        with anyio.fail_after(WITHIN * 3):
            async with app.router.lifespan_context(app):
                yield Served(sandbox, backend, interpreter, app, tokens)


Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_before_reading: bytes | None = None  # the answer's body as sent when the app first read the request's

    def json(self) -> Any:
        return json.loads(self.body)


async def call_asgi(app: Starlette, method: str, path: str, headers: Mapping[str, str], receive: Receive) -> Answer:
    """One request straight into the app, with the test's own ``receive``."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", PORT),
    }
    answer = Answer(0, {}, b"")
    complete = anyio.Event()
    body_over = False

    async def receive_then_wait() -> dict[str, Any]:
        """The test's body; once it has all been read, a disconnect when the response is complete
        (an event stream listens for it), as a server does."""
        nonlocal body_over
        if body_over:
            await complete.wait()
            return {"type": "http.disconnect"}
        if answer.sent_before_reading is None:
            answer.sent_before_reading = answer.body if answer.status else b""
        message = await receive()
        body_over = not message.get("more_body", False)
        return message

    async def send(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")
            if not message.get("more_body", False):
                complete.set()

    with anyio.fail_after(WITHIN):
        await app(scope, receive_then_wait, send)
    return answer


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def structured(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error is False, text_of(result)
    data: dict[str, Any] | None = result.structured_content
    assert data is not None
    return data


# -- authentication ------------------------------------------------------------------------------


async def test_mcp_without_a_valid_token_gets_401_naming_the_resource_metadata(tmp_path: Path) -> None:
    async with served(tmp_path, "alice") as app:
        alice = app.tokens["alice"]
        wrong = [
            {},
            {"Authorization": "Bearer cmx_not-a-token"},
            {"Authorization": "Bearer "},
            {"Authorization": f"Bearer {hashlib.sha256(alice.encode()).hexdigest()}"},  # the file's line, not a token
            {"Authorization": f"Basic {alice}"},
            {"Authorization": alice},
            {"Authorization": f"Bearer {alice}x"},
        ]
        async with app.http() as http:
            for headers in wrong:
                for method in ("POST", "GET", "DELETE"):
                    answer = await http.request(method, "/mcp", json=INITIALIZE, headers=MCP_HEADERS | headers)
                    assert answer.status_code == 401, (method, headers)
                    assert answer.headers["www-authenticate"] == WWW_AUTHENTICATE
                    assert answer.json()["error"] == "invalid_token"
                    assert "mcp-session-id" not in answer.headers
            good = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS | {"Authorization": f"Bearer {alice}"})
            assert good.status_code == 200 and good.headers["mcp-session-id"]
        assert app.refusals("unauthorized") == len(wrong) * 3
        assert app.backend.jobs == []


async def test_an_mcp_session_answers_only_the_principal_that_opened_it(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", "bob") as app, app.http() as http:
        alice = MCP_HEADERS | {"Authorization": f"Bearer {app.tokens['alice']}"}
        bob = MCP_HEADERS | {"Authorization": f"Bearer {app.tokens['bob']}"}
        opened = await http.post("/mcp", json=INITIALIZE, headers=alice)
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        refused = await http.post("/mcp", json=listing, headers=bob | session)
        assert refused.status_code == 404  # as if it did not exist
        assert "execute_code" not in refused.text
        answered = await http.post("/mcp", json=listing, headers=alice | session)
        assert answered.status_code == 200 and "execute_code" in answered.text


# -- Origin --------------------------------------------------------------------------------------


async def test_a_foreign_origin_is_refused_on_every_route(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", http_allowed_origins=["https://ok.example"]) as app:
        token = {"Authorization": f"Bearer {app.tokens['alice']}"}
        paths = ["/healthz", "/readyz", "/metrics", "/mcp", "/.well-known/oauth-protected-resource", "/nowhere"]
        async with app.http() as http:
            for origin in ("https://evil.example", "null", "https://ok.example.evil.example", "http://ok.example"):
                for path in paths:
                    answer = await http.get(path, headers={"Origin": origin} | token)
                    assert answer.status_code == 403, (origin, path)
                    assert answer.json()["error"] == "forbidden_origin"
            # Before authentication: a page elsewhere learns nothing, even whether its token would do.
            posted = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS | {"Origin": "https://evil.example"})
            assert posted.status_code == 403 and "www-authenticate" not in posted.headers
            assert (await http.get("/healthz", headers={"Origin": "https://ok.example"})).status_code == 200
            assert (await http.get("/healthz")).status_code == 200  # agents and SDKs send no Origin
            allowed = await http.post(
                "/mcp", json=INITIALIZE, headers=MCP_HEADERS | token | {"Origin": "https://ok.example"}
            )
            assert allowed.status_code == 200
        assert app.refusals("forbidden_origin") == 4 * len(paths) + 1


async def test_without_allowed_origins_any_origin_is_refused(tmp_path: Path) -> None:
    async with served(tmp_path, insecure_no_auth=True) as app, app.http() as http:
        assert (await http.get("/healthz", headers={"Origin": f"http://127.0.0.1:{PORT}"})).status_code == 403
        assert (await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS | {"Origin": "null"})).status_code == 403


# -- the body bound ------------------------------------------------------------------------------


class Endless:
    """A body that never ends, in chunks of ``size`` bytes; how much of it the app read, and when."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.chunks = 0

    async def __call__(self) -> dict[str, Any]:
        self.chunks += 1
        await anyio.lowlevel.checkpoint()  # a server yields here: the app's own time bounds can fire
        return {"type": "http.request", "body": b"x" * self.size, "more_body": True}


async def never_arrives() -> dict[str, Any]:
    await anyio.sleep_forever()
    raise AssertionError


@pytest.fixture
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a refusal the app reads and drops the rest of the body (so that closing the connection
    does not reset it before the client has the answer), for at most LINGER_SECONDS and LINGER_BYTES:
    small ones here, to see both bounds hold."""
    monkeypatch.setattr(http_server, "LINGER_SECONDS", 0.2)
    monkeypatch.setattr(http_server, "LINGER_BYTES", 20_000)


@pytest.mark.usefixtures("short_linger")
async def test_a_body_declared_too_large_gets_413_before_any_of_it_is_read(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", http_max_body_bytes=4096) as app:
        token = {"Authorization": f"Bearer {app.tokens['alice']}"}
        for size in ("4097", str(10**15)):
            for body in (Endless(), never_arrives):
                answer = await call_asgi(app.app, "POST", "/mcp", MCP_HEADERS | token | {"Content-Length": size}, body)
                assert answer.status == 413
                assert answer.json()["error"] == "body_too_large"
                assert "4096" in answer.json()["error_description"]
                assert answer.headers["connection"] == "close"
                assert answer.sent_before_reading == answer.body  # the whole answer, then the rest is dropped
                if isinstance(body, Endless):
                    assert body.chunks * body.size <= 20_000 + 2 * body.size  # dropped within LINGER_BYTES
        async with app.http(app.tokens["alice"]) as http:
            over = await http.post("/mcp", content=b"x" * 4097, headers=MCP_HEADERS)
            assert over.status_code == 413
            at = await http.post("/mcp", content=b"x" * 4096, headers=MCP_HEADERS)
            assert at.status_code not in {413, 408}  # at the limit: the MCP layer's own answer (not JSON)
        assert app.refusals("body_too_large") == 5
        assert app.backend.jobs == []


@pytest.mark.usefixtures("short_linger")
async def test_a_body_is_checked_after_authentication(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", http_max_body_bytes=4096, http_request_timeout_seconds=3600) as app:
        for headers in ({"Content-Length": "99999"}, {"Transfer-Encoding": "chunked"}):
            for body in (Endless(), never_arrives):  # 401 at once: not after the body, nor in an hour
                answer = await call_asgi(app.app, "POST", "/mcp", MCP_HEADERS | headers, body)
                assert answer.status == 401
                assert answer.sent_before_reading in {None, answer.body}
                assert "www-authenticate" in answer.headers
        assert app.refusals("body_too_large") == app.refusals("request_timeout") == 0
        assert app.refusals("unauthorized") == 4


@pytest.mark.usefixtures("short_linger")
async def test_a_streamed_body_gets_413_as_soon_as_it_passes_the_limit(tmp_path: Path) -> None:
    body = Endless()
    chunks_when_answered = 0

    async with served(tmp_path, "alice", http_max_body_bytes=4096) as app:
        headers = MCP_HEADERS | {"Authorization": f"Bearer {app.tokens['alice']}", "Transfer-Encoding": "chunked"}
        original = app.app

        async def watching(scope: Any, receive: Any, send: Any) -> None:
            async def noting(message: Any) -> None:
                nonlocal chunks_when_answered
                if message["type"] == "http.response.start":
                    chunks_when_answered = body.chunks
                await send(message)

            await original(scope, receive, noting)

        answer = await call_asgi(watching, "POST", "/mcp", headers, body)  # type: ignore[arg-type]
        assert answer.status == 413
        assert answer.json()["error"] == "body_too_large"
        assert chunks_when_answered == 5  # 5000 bytes: the first chunk past 4096, and not one more
        assert body.chunks * body.size <= 5000 + 20_000 + 2 * body.size  # then dropped within LINGER_BYTES
        assert app.backend.jobs == []


async def test_a_body_that_does_not_arrive_in_time_gets_408(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", http_request_timeout_seconds=0.1) as app:
        headers = MCP_HEADERS | {"Authorization": f"Bearer {app.tokens['alice']}"}
        calls = 0

        async def stalls_after_a_chunk() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b'{"jsonrpc": "2.0", ', "more_body": True}
            await anyio.sleep_forever()
            raise AssertionError

        async def never_starts() -> dict[str, Any]:
            await anyio.sleep_forever()
            raise AssertionError

        for receive in (stalls_after_a_chunk, never_starts):
            answer = await call_asgi(app.app, "POST", "/mcp", headers, receive)
            assert answer.status == 408
            assert answer.json() == {
                "error": "request_timeout",
                "error_description": "the body did not arrive within 0.1 s",
            }
            assert answer.headers["connection"] == "close"
        assert app.refusals("request_timeout") == 2
        assert app.backend.jobs == [] and app.sandbox.admission.running == 0


async def test_a_body_that_arrives_in_pieces_within_the_limits_is_served(tmp_path: Path) -> None:
    body = json.dumps(INITIALIZE).encode()
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]

    async def in_pieces() -> dict[str, Any]:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async with served(tmp_path, "alice", http_max_body_bytes=4096) as app:
        headers = MCP_HEADERS | {"Authorization": f"Bearer {app.tokens['alice']}"}
        answer = await call_asgi(app.app, "POST", "/mcp", headers, in_pieces)
        assert answer.status == 200
        assert answer.headers["mcp-session-id"]
        assert b'"serverInfo"' in answer.body


# -- health, readiness, metrics, metadata ---------------------------------------------------------


async def test_healthz_answers_without_a_token(tmp_path: Path) -> None:
    async with served(tmp_path, "alice") as app, app.http() as http:
        answer = await http.get("/healthz")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok", "version": __version__}
        app.backend.engine_down = True
        assert (await http.get("/healthz")).status_code == 200  # the process serves, whatever the engine


async def test_readyz_is_200_when_the_engine_answers_and_every_image_is_there(tmp_path: Path) -> None:
    async with served(tmp_path, "alice") as app, app.http() as http:
        answer = await http.get("/readyz")
        assert (answer.status_code, answer.json()) == (200, {"ready": True})
        assert answer.headers["cache-control"] == "no-store"


async def test_readyz_is_503_with_a_reason_when_the_engine_does_not_answer(tmp_path: Path) -> None:
    async with served(tmp_path, "alice") as app, app.http() as http:
        app.backend.engine_down = True
        answer = await http.get("/readyz")
        assert (answer.status_code, answer.json()) == (
            503,
            {"ready": False, "reason": "the isolation engine does not answer"},
        )


async def test_readyz_is_503_naming_the_runtimes_whose_images_are_missing(tmp_path: Path) -> None:
    backend = FakeBackend(missing=frozenset({"bash", "javascript"}))
    async with served(tmp_path, "alice", backend=backend) as app, app.http() as http:
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert answer.json() == {
            "ready": False,
            "reason": "runtime images missing or stale",
            "runtimes": ["bash", "javascript"],
        }


async def test_readyz_is_cached_for_a_moment_but_a_drain_shows_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(tmp_path, "alice") as app, app.http() as http:
        assert (await http.get("/readyz")).status_code == 200
        app.backend.engine_down = True
        assert (await http.get("/readyz")).status_code == 200  # within READY_CACHE_SECONDS: the last answer
        monkeypatch.setattr(http_server, "READY_CACHE_SECONDS", 0.0)
        assert (await http.get("/readyz")).status_code == 503
        app.backend.engine_down = False
        assert (await http.get("/readyz")).status_code == 200
        monkeypatch.setattr(http_server, "READY_CACHE_SECONDS", 3600.0)
        app.sandbox.drain()
        answer = await http.get("/readyz")
        assert (answer.status_code, answer.json()) == (503, {"ready": False, "reason": "shutting down"})


async def test_metrics_need_a_token_unless_public(tmp_path: Path) -> None:
    async with served(tmp_path, "alice") as app, app.http() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            refused = await http.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == WWW_AUTHENTICATE
            assert "codomyrmex_sandbox" not in refused.text
        answer = await http.get("/metrics", headers={"Authorization": f"Bearer {app.tokens['alice']}"})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert answer.headers["cache-control"] == "no-store"
        assert 'codomyrmex_sandbox_refusals_total{reason="unauthorized"} 2.0' in answer.text
        assert "codomyrmex_sandbox_running_executions 0.0" in answer.text
    publicly: list[dict[str, Any]] = [{"metrics_public": True}, {"insecure_no_auth": True}]
    for public in publicly:
        names = ("alice",) if "metrics_public" in public else ()
        async with served(tmp_path, *names, **public) as app, app.http() as http:
            answer = await http.get("/metrics")
            assert answer.status_code == 200, public
            assert "codomyrmex_sandbox_queue_depth" in answer.text


async def test_the_protected_resource_metadata_is_served_at_both_paths(tmp_path: Path) -> None:
    expected = {
        "resource": f"{BASE}/mcp",
        "bearer_methods_supported": ["header"],
        "resource_name": "codomyrmex-sandbox",
    }
    async with served(tmp_path, "alice") as app, app.http() as http:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            answer = await http.get(path)
            assert (answer.status_code, answer.json()) == (200, expected), path
    async with served(tmp_path, **JWT_SETTINGS) as app, app.http() as http:
        answer = await http.get("/.well-known/oauth-protected-resource/mcp")
        assert answer.json() == expected | {"authorization_servers": [ISSUER]}


async def test_a_public_url_names_the_resource_and_the_metadata_behind_a_proxy(tmp_path: Path) -> None:
    public = "https://sandbox.example.com/mcp"
    async with served(tmp_path, "alice", http_public_url=public) as app, app.http() as http:
        refused = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert (
            'resource_metadata="https://sandbox.example.com/.well-known/oauth-protected-resource/mcp"'
            in (refused.headers["www-authenticate"])
        )
        answer = await http.get("/.well-known/oauth-protected-resource/mcp")
        assert answer.json()["resource"] == public


async def test_without_authentication_there_is_no_metadata_and_everyone_is_anonymous(tmp_path: Path) -> None:
    async with served(tmp_path, insecure_no_auth=True) as app:
        async with app.http() as http:
            for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
                assert (await http.get(path)).status_code == 404
        with capture_logs() as logs:
            async with app.mcp(None) as client:
                assert structured(await client.call_tool("execute_code", {"code": "print hi"}))["stdout"] == "hi\n"
    principals = {entry["principal"] for entry in logs if entry["event"].startswith("audit.")}
    assert principals == {"anonymous"}


# -- principals through MCP calls (server.py's caller_of) -----------------------------------------


async def test_two_principals_sessions_are_apart_and_outlive_the_connection(tmp_path: Path) -> None:
    async with served(tmp_path, "alice", "bob") as app:
        with capture_logs() as logs:
            async with app.mcp(app.tokens["alice"]) as alice:
                session_id = structured(await alice.call_tool("create_session", {}))["session_id"]
                structured(await alice.call_tool("execute_code", {"code": "set a=1", "session_id": session_id}))
            async with app.mcp(app.tokens["bob"]) as bob:
                theirs = await bob.call_tool("execute_code", {"code": "get a", "session_id": session_id})
                made_up = await bob.call_tool("execute_code", {"code": "get a", "session_id": MADE_UP_ID})
                assert theirs.is_error is True and made_up.is_error is True
                # Another principal's id gets the same answer as one never issued.
                assert text_of(theirs).replace(session_id, "<id>") == text_of(made_up).replace(MADE_UP_ID, "<id>")
                assert structured(await bob.call_tool("list_sessions", {}))["sessions"] == []
                closed = await bob.call_tool("close_session", {"session_id": session_id})
                assert closed.is_error is True
                structured(await bob.call_tool("execute_code", {"code": "print from bob"}))
            # alice's first connection is gone; her session is not: it is hers, not the connection's.
            async with app.mcp(app.tokens["alice"]) as alice:
                listed = structured(await alice.call_tool("list_sessions", {}))["sessions"]
                assert [entry["session_id"] for entry in listed] == [session_id]
                kept = structured(await alice.call_tool("execute_code", {"code": "get a", "session_id": session_id}))
                assert kept["return_value"] == "'1'"
                structured(await alice.call_tool("close_session", {"session_id": session_id}))
    audit = [entry for entry in logs if entry["event"].startswith("audit.")]
    by_principal: dict[str, set[str]] = {}
    for entry in audit:
        by_principal.setdefault(entry["principal"], set()).add(entry["event"])
    assert by_principal == {
        "alice": {"audit.session_created", "audit.execution_started", "audit.execution", "audit.session_ended"},
        "bob": {"audit.execution_started", "audit.execution"},
    }
    bobs = [entry for entry in audit if entry["principal"] == "bob" and entry["event"] == "audit.execution"]
    assert sorted(entry["status"] for entry in bobs) == ["denied", "denied", "success"]
    alices = [entry for entry in audit if entry["principal"] == "alice" and entry["event"] == "audit.execution"]
    assert [entry["session_id"] for entry in alices] == [session_id, session_id]


async def test_a_busy_principal_is_refused_over_mcp_while_another_runs(tmp_path: Path) -> None:
    async with (
        served(tmp_path, "alice", "bob", max_concurrent_executions=4, max_concurrent_executions_per_principal=1) as app,
        AsyncExitStack() as stack,
    ):
        first, second, bob = [
            await stack.enter_async_context(app.mcp(app.tokens[name])) for name in ("alice", "alice", "bob")
        ]
        results: list[CallToolResult] = []
        async with anyio.create_task_group() as tg:

            async def call(client: Client, code: str) -> None:
                results.append(await client.call_tool("execute_code", {"code": code}))

            tg.start_soon(call, first, "wait")
            with anyio.fail_after(WITHIN):
                while app.interpreter.waiting == 0:
                    await wait_all_tasks_blocked()
            refused = await second.call_tool("execute_code", {"code": "print again"})  # alice, another connection
            assert refused.is_error is True
            assert "you already have 1 executions running or queued" in text_of(refused)
            assert structured(await bob.call_tool("execute_code", {"code": "print bob"}))["stdout"] == "bob\n"
            app.interpreter.gate.set()
        assert structured(results[0])["status"] == "success"
        assert app.refusals("principal_busy") == 1


class AsgiEndpoint:
    """An ASGI callable that Starlette's Route passes the raw request to (a bare method it would not)."""

    def __init__(self, app: Callable[[Any, Any, Any], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def test_an_http_app_that_names_no_principal_refuses_calls(tmp_path: Path) -> None:
    """build_server over HTTP without build_app's authentication in front: no call may share state."""
    backend = FakeBackend(Interpreter())
    async with Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox:
        manager = StreamableHTTPSessionManager(
            app=build_server(sandbox),
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        bare = Starlette(routes=[Route("/mcp", endpoint=AsgiEndpoint(manager.handle_request))])
        async with (
            manager.run(),
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=bare), base_url=BASE, timeout=WITHIN) as http,
            Client(streamable_http_client(f"{BASE}/mcp", http_client=http)) as client,
        ):
            with pytest.raises(MCPError, match="names no principal"):
                await client.call_tool("execute_code", {"code": "print hi"})
        assert backend.jobs == []


# -- settings ------------------------------------------------------------------------------------


def http_settings(**values: Any) -> Settings:
    return Settings.load(backend="fake", transport="http", **values)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        pytest.param({}, "refusing to serve HTTP on a loopback address without authentication", id="no auth"),
        pytest.param({"http_host": EVERYWHERE}, "'0.0.0.0', which is not a loopback address", id="no auth, 0.0.0.0"),
        pytest.param(
            {"http_host": EVERYWHERE, "insecure_no_auth": True}, "for loopback development only", id="insecure"
        ),
        pytest.param({"http_host": "::", "insecure_no_auth": True}, "for loopback development only", id="insecure ::"),
        pytest.param(
            {"http_host": "192.168.1.5", "insecure_no_auth": True}, "for loopback development only", id="insecure lan"
        ),
    ],
)
def test_an_unsafe_http_configuration_is_refused_with_how_to_fix_it(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_http_settings(http_settings(**values))
    message = str(refused.value)
    assert says in message
    assert "auth_tokens_file" in message and "auth new-token" in message


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"insecure_no_auth": True}, id="insecure on 127.0.0.1"),
        pytest.param({"insecure_no_auth": True, "http_host": "::1"}, id="insecure on ::1"),
        pytest.param({"insecure_no_auth": True, "http_host": "localhost"}, id="insecure on localhost"),
        pytest.param({"auth_tokens_file": Path("/nonexistent/tokens.txt"), "http_host": EVERYWHERE}, id="tokens"),
        pytest.param({"http_host": EVERYWHERE, **JWT_SETTINGS}, id="JWT"),
    ],
)
def test_a_safe_http_configuration_is_accepted(values: dict[str, Any]) -> None:
    check_http_settings(http_settings(**values))


@pytest.mark.parametrize("missing", list(JWT_SETTINGS))
def test_jwt_settings_come_all_three_or_none(missing: str) -> None:
    given = {name: value for name, value in JWT_SETTINGS.items() if name != missing}
    with pytest.raises(ConfigurationError, match=rf"JWT authentication needs all of .*{missing} missing"):
        Settings.load(backend="fake", **given)
    only = {missing: JWT_SETTINGS[missing]}
    with pytest.raises(ConfigurationError, match="JWT authentication needs all of"):
        Settings.load(backend="fake", **only)
    assert Settings.load(backend="fake", **JWT_SETTINGS).jwt_configured
    assert not Settings.load(backend="fake").auth_configured


def test_a_jwks_url_must_be_http_or_https() -> None:
    with pytest.raises(ConfigurationError, match="auth_jwks_url"):
        Settings.load(backend="fake", **JWT_SETTINGS | {"auth_jwks_url": "file:///etc/jwks.json"})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"max_concurrent_executions": 8}, 4),
        ({"max_concurrent_executions": 3}, 1),
        ({"max_concurrent_executions": 1}, 1),
        ({"max_concurrent_executions": 8, "max_concurrent_executions_per_principal": 6}, 6),
        ({"max_concurrent_executions": 2, "max_concurrent_executions_per_principal": 5}, 5),
    ],
)
def test_a_principal_gets_half_the_slots_by_default(values: dict[str, Any], expected: int) -> None:
    settings = Settings.load(backend="fake", **values)
    assert settings.principal_concurrency() == expected
    assert Sandbox(settings, backend=FakeBackend()).admission.per_principal == expected


def test_the_body_limit_defaults_to_what_the_largest_legal_call_needs() -> None:
    default = Settings.load(backend="fake")
    code, stdin, files = MIB, MIB, 16 * MIB
    assert default.max_body_bytes() == 2 * (code + stdin) + -(-files * 4 // 3) + MIB == 27_612_502
    assert Settings.load(backend="fake", http_max_body_bytes=5000).max_body_bytes() == 5000
    bigger = Settings.load(backend="fake", language_limits={"bash": {"max_code_bytes": 8 * MIB}})
    assert bigger.max_body_bytes() == default.max_body_bytes() + 2 * 7 * MIB
    data_science = Settings.load(backend="fake", profile="data-science")
    assert data_science.max_body_bytes() == 2 * (code + stdin) + -(-128 * MIB * 4 // 3) + MIB
    strict = Settings.load(backend="fake", profile="strict")
    assert strict.max_body_bytes() < default.max_body_bytes()


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() as the console script runs it, minus the process-wide logging set-up (which would point
    the root logger at this test's captured stderr) and the operator's authentication settings."""
    monkeypatch.setattr("codomyrmex_sandbox.logs.configure_logging", lambda *_args: None)
    for name in ("AUTH_TOKENS_FILE", "AUTH_JWT_ISSUER", "AUTH_JWT_AUDIENCE", "AUTH_JWKS_URL", "INSECURE_NO_AUTH"):
        monkeypatch.delenv(f"CODOMYRMEX_SANDBOX_{name}", raising=False)
    for name in ("HTTP_HOST", "HTTP_PORT", "TRANSPORT"):
        monkeypatch.delenv(f"CODOMYRMEX_SANDBOX_{name}", raising=False)


@pytest.mark.usefixtures("quiet_cli")
def test_auth_new_token_prints_the_token_and_appends_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.txt"
    assert cli.main(["auth", "new-token", "alice", "--append", str(path)]) == 0
    first = capsys.readouterr()
    token, line = first.out.splitlines()
    assert re.fullmatch(r"cmx_[A-Za-z0-9_-]{43}", token)
    assert line == f"alice {hashlib.sha256(token.encode()).hexdigest()}"
    assert path.read_text() == line + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in first.err and "shown only now" in first.err

    assert cli.main(["auth", "new-token", "bob", "--append", str(path)]) == 0  # appends, keeps alice
    second_token, second_line = capsys.readouterr().out.splitlines()
    assert path.read_text() == f"{line}\n{second_line}\n"
    assert second_token != token

    assert cli.main(["auth", "new-token", "carol"]) == 0  # without --append: printed only
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert path.read_text().count("\n") == 2


@pytest.mark.usefixtures("quiet_cli")
def test_auth_new_token_refuses_a_bad_name_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.txt"
    assert cli.main(["auth", "new-token", "al ice", "--append", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "a token name must be" in captured.err
    assert not path.exists()


class Started(Exception):  # noqa: N818 - not an error: the sign that serving would have begun
    pass


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """cli._serve replaced: it records the settings and stops main() before anything is served."""
    seen: list[Settings] = []

    async def serve(settings: Settings) -> None:
        seen.append(settings)
        raise Started

    monkeypatch.setattr(cli, "_serve", serve)
    return seen


@pytest.mark.usefixtures("quiet_cli")
@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--host", EVERYWHERE], "without authentication", id="0.0.0.0 without auth"),
        pytest.param([], "without authentication", id="loopback without auth"),
        pytest.param(["--host", EVERYWHERE, "--insecure-no-auth"], "loopback development only", id="insecure 0.0.0.0"),
    ],
)
def test_serve_refuses_an_unsafe_http_configuration_before_starting_anything(
    args: list[str], says: str, serving: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--transport", "http", *args]) == 2
    assert serving == []
    err = capsys.readouterr().err
    assert err.startswith("codomyrmex-sandbox: ") and says in err


@pytest.mark.usefixtures("quiet_cli")
def test_serve_starts_with_a_safe_http_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: list[Settings]
) -> None:
    """The other side of the refusals: the same command line with tokens configured gets to serving."""
    path = tmp_path / "tokens.txt"
    path.write_text(new_token("alice")[1] + "\n", encoding="utf-8")
    monkeypatch.setenv("CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE", str(path))
    with pytest.raises(Started):
        cli.main(["serve", "--transport", "http", "--host", EVERYWHERE, "--port", "0"])
    assert [(s.transport, s.http_host, s.http_port, s.auth_tokens_file) for s in serving] == [
        ("http", EVERYWHERE, 0, path)
    ]
    monkeypatch.delenv("CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE")
    with pytest.raises(Started):
        cli.main(["serve", "--transport", "http", "--insecure-no-auth"])
    assert serving[-1].insecure_no_auth and serving[-1].http_host == "127.0.0.1"

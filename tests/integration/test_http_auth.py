"""Who may use the HTTP transport, and what is refused before a request reaches MCP.

Real servers (``codomyrmex-sandbox serve --transport http``, see tests/http_support.py) on a real
engine. In front of ``/mcp`` the server checks, in this order: the ``Origin`` header (403), the bearer
token from the ``Authorization`` header only (401, with the RFC 9728 challenge), then the body's size
(413, without reading it whole). Tokens come from a tokens file (read again when it changes) or are
JWTs from an issuer whose JWKS the tests serve themselves on loopback. ``--insecure-no-auth`` is for
loopback development only, and the server refuses to start without authentication otherwise.

The servers that several tests share are module-scoped (the tests do not disturb each other). When
one stops, it must exit 0, leave no sandbox behind, and never have logged a token that the tests
sent it, valid or not (nor the first 12 characters of one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from codomyrmex_sandbox.auth import new_token
from tests.http_support import HttpServer, TokenSet, http_server, start_refused
from tests.support import (
    MANAGED,
    OWNER_HOST,
    OWNER_PID,
    OwnedSandboxes,
    ToolSession,
    console_script,
    process_alive,
    server_environment,
)

pytestmark = pytest.mark.docker

QUICK = 10.0  # a refusal, or a call that prints a line, is answered well within this
NPX_TIMEOUT = 180.0  # the first run downloads the Inspector from the npm registry
WELL_KNOWN = "/.well-known/oauth-protected-resource"
PROTOCOL_VERSION = "2025-06-18"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "test_http_auth", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
TOOLS = {"execute_code", "create_session", "close_session", "list_sessions"}
EVIL = "https://evil.example"
ALLOWED = "https://ok.example"
BODY_LIMIT = 65536
ISSUER = "https://issuer.test.example"
AUDIENCE = "codomyrmex-sandbox-tests"
WRONG_TOKEN = new_token("alice")[0]  # well formed, in no tokens file
RSA_KID = "rsa-1"
EC_KID = "ec-1"


# -- servers and what was sent to them ---------------------------------------------------------


@dataclass
class Served:
    """A running server and every bearer token the tests gave it (or tried on it), valid or not."""

    server: HttpServer
    tokens: TokenSet | None = None
    sent: list[str] = field(default_factory=list)

    def sending(self, token: str) -> str:
        """``token``, remembered so that the checks can make sure the server never logs it."""
        self.sent.append(token)
        return token

    def token(self, name: str) -> str:
        """The valid token of principal ``name`` from this server's tokens file."""
        assert self.tokens is not None, "this server has no tokens file"
        return self.tokens[name]

    @property
    def tokens_file(self) -> Path:
        assert self.tokens is not None, "this server has no tokens file"
        return self.tokens.path

    def secrets(self) -> list[str]:
        return [*(self.tokens.tokens.values() if self.tokens is not None else ()), WRONG_TOKEN, *self.sent]


@contextmanager
def serving(engine: OwnedSandboxes, *args: str, tokens: TokenSet | None = None, **env: str) -> Iterator[Served]:
    """A server for a module's tests. After it stopped (exit 0, checked by `http_server`): none of its
    sandboxes is left, and no token given to it appears in anything it wrote."""
    with http_server(*args, tokens=tokens, env=env) as server:
        served = Served(server, tokens)
        yield served
    left = engine.containers(owners={server.process.pid})
    if left:
        pytest.fail(f"the server exited and left {len(left)} sandbox(es) behind")
    assert_not_logged(server.stderr(), served.secrets())


def assert_not_logged(text: str, secrets: Iterable[str]) -> None:
    """No secret, nor its first 12 characters, occurs in ``text`` (the message does not repeat it)."""
    for number, secret in enumerate(secrets):
        for piece in (secret, secret[:12]):
            if piece and piece in text:
                where = text.index(piece)
                pytest.fail(
                    f"token #{number} (or its first 12 characters) was logged, near: "
                    f"{text[max(0, where - 120) : where].splitlines()[-1:]}"
                )


def audit_end(server: HttpServer, execution_id: str, *, within: float = QUICK) -> dict[str, Any]:
    """The end record (``audit.execution``) of one execution, once the server has written it."""
    marker = '"event": "audit.execution"'
    with server._changed:  # the reader thread appends under this lock and notifies
        server._changed.wait_for(
            lambda: any(marker in line and execution_id in line for line in server.lines), timeout=within
        )
    found = [record for record in server.events("audit.execution") if record.get("execution_id") == execution_id]
    assert len(found) == 1, f"expected one audit.execution record for {execution_id}, found {found}"
    return found[0]


async def run_as(served: Served, token: str | None, code: str = "print(6*7)") -> tuple[dict[str, Any], dict[str, Any]]:
    """Call execute_code with the MCP SDK's client, sending ``token``: the result and its audit end record."""
    async with served.server.client(token) as client:
        result = await ToolSession(client).run(code, timeout_seconds=QUICK)
    return result, audit_end(served.server, result["execution_id"])


async def initialize(
    server: HttpServer, token: str | None = None, *, path: str = "/mcp", **headers: str
) -> httpx2.Response:
    """POST an MCP initialize request, as a client's first request is; ``headers`` are added (``_`` as ``-``)."""
    extra = {name.replace("_", "-"): value for name, value in headers.items()}
    async with server.http(token, headers=MCP_HEADERS | extra) as http:
        with anyio.fail_after(QUICK):
            response = await http.post(path, json=INITIALIZE)
            await end_session(http, response)
    return response


async def end_session(http: httpx2.AsyncClient, response: httpx2.Response) -> None:
    """Close the MCP session an initialize opened (so that the server holds nothing for the test)."""
    session = response.headers.get("mcp-session-id")
    if response.status_code == 200 and session is not None:
        headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": PROTOCOL_VERSION}
        await http.delete("/mcp", headers=headers)


def assert_served(response: httpx2.Response) -> None:
    """The initialize reached MCP: 200, a session id, and the initialize result in the event stream."""
    assert response.status_code == 200, (response.status_code, response.text[:500])
    assert response.headers.get("mcp-session-id")
    assert '"protocolVersion"' in response.text


def assert_invalid_token(response: httpx2.Response | RawResponse, server: HttpServer) -> None:
    """401 with the challenge MCP clients follow: ``Bearer``, ``invalid_token`` and the metadata's URL."""
    assert response.status_code == 401, (response.status_code, response.headers)
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer "), challenge
    assert 'error="invalid_token"' in challenge, challenge
    assert f'resource_metadata="{server.base}{WELL_KNOWN}/mcp"' in challenge, challenge
    assert response.json()["error"] == "invalid_token"


def assert_forbidden_origin(response: httpx2.Response) -> None:
    assert response.status_code == 403, (response.status_code, response.text[:300])
    assert response.json()["error"] == "forbidden_origin"


# -- requests written by hand ------------------------------------------------------------------


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    server: HttpServer, head: Sequence[str], parts: Sequence[bytes] = (), *, within: float = QUICK
) -> RawResponse:
    """Send a request written by hand (what an HTTP library would not send: a header with trailing
    spaces, a body that never ends) and read the answer, which must come within ``within`` seconds."""
    request = "\r\n".join([*head, f"Host: 127.0.0.1:{server.port}", "Connection: close", "", ""])
    data = b""
    try:
        with anyio.fail_after(within):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(request.encode("latin-1"))
                for part in parts:
                    await stream.send(part)
                while not _complete(data):
                    try:
                        data += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
    except TimeoutError:
        pytest.fail(f"no answer within {within} s (received {data[:200]!r}): the server waited for more")
    return _parse(data)


def _complete(data: bytes) -> bool:
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return length is not None and len(body) >= int(length.group(1))


def _parse(data: bytes) -> RawResponse:
    head, found, body = data.partition(b"\r\n\r\n")
    assert found, f"not an HTTP response: {data[:300]!r}"
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(int(status.split()[1]), headers, body)


def post_head(token: str | None = None, *more: str) -> list[str]:
    head = ["POST /mcp HTTP/1.1", *(f"{name}: {value}" for name, value in MCP_HEADERS.items())]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    return [*head, *more]


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def padded_initialize(size: int) -> bytes:
    """An initialize request of exactly ``size`` bytes (JSON allows trailing white space)."""
    body = json.dumps(INITIALIZE).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def chunks_of(data: bytes, size: int = 16384) -> AsyncIterator[bytes]:
    """``data`` as an async generator: the HTTP client sends it chunked, with no Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- a JWT issuer on loopback ------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class Issuer:
    """An issuer's keys (one RSA, one EC), a key it never published, and its JWKS served on loopback."""

    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    rogue_key: rsa.RSAPrivateKey  # not in the JWKS
    httpd: ThreadingHTTPServer
    fetches: int = 0  # GETs of the JWKS so far
    _counting: threading.Lock = field(default_factory=threading.Lock)

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True)
        return {
            "keys": [
                {**rsa_jwk, "kid": RSA_KID, "use": "sig", "alg": "RS256"},
                {**ec_jwk, "kid": EC_KID, "use": "sig", "alg": "ES256"},
            ]
        }

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Good claims for ``carol``; a change to None removes the claim."""
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "iat": now, "exp": now + 600} | changes
        return {name: value for name, value in claims.items() if value is not None}

    def token(self, *, key: Any = None, kid: str = RSA_KID, algorithm: str = "RS256", **changes: Any) -> str:
        return jwt.encode(
            self.claims(**changes), key if key is not None else self.rsa_key, algorithm=algorithm, headers={"kid": kid}
        )

    def public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@contextmanager
def jwks_served() -> Iterator[Issuer]:
    """New keys, and their JWKS served by a thread of this process on a loopback port of its own."""
    issuer: Issuer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/jwks.json":
                self.send_error(404)
                return
            with issuer._counting:
                issuer.fetches += 1
            body = json.dumps(issuer.jwks()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:  # the test's output is not the place
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    issuer = Issuer(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        httpd,
    )
    thread = threading.Thread(target=httpd.serve_forever, name="jwks", daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def unsigned(issuer: Issuer) -> str:
    """``alg: none``: a token anyone can write."""
    header = {"alg": "none", "typ": "JWT", "kid": RSA_KID}
    return f"{b64url_json(header)}.{b64url_json(issuer.claims())}."


def hmac_with_the_public_key(issuer: Issuer) -> str:
    """HS256 with the RSA public key's PEM as the secret: a verifier that takes the alg from the token
    and the key from the JWKS would check an HMAC anyone can compute (key confusion)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": RSA_KID}
    signing_input = f"{b64url_json(header)}.{b64url_json(issuer.claims())}"
    signature = hmac.new(issuer.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def tampered(issuer: Issuer) -> str:
    """A good token whose payload was changed (another sub) and whose signature was kept."""
    header, _, signature = issuer.token().split(".")
    return f"{header}.{b64url_json(issuer.claims(sub='mallory'))}.{signature}"


FORGED: dict[str, Callable[[Issuer], str]] = {
    "expired": lambda issuer: issuer.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
    "not-yet-valid": lambda issuer: issuer.token(nbf=int(time.time()) + 3600, exp=int(time.time()) + 7200),
    "no-exp": lambda issuer: issuer.token(exp=None),
    "wrong-iss": lambda issuer: issuer.token(iss="https://other-issuer.example"),
    "wrong-aud": lambda issuer: issuer.token(aud="another-service"),
    "no-sub": lambda issuer: issuer.token(sub=None),
    "key-not-in-the-jwks-same-kid": lambda issuer: issuer.token(key=issuer.rogue_key),
    "unknown-kid": lambda issuer: issuer.token(key=issuer.rogue_key, kid="rsa-unknown"),
    "alg-none": unsigned,
    "hs256-with-the-public-key": hmac_with_the_public_key,
    "tampered-payload": tampered,
}


# -- fixtures: one server per kind -------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(engine: OwnedSandboxes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Tokens from a file (alice, bob); every other setting at its default."""
    tokens = TokenSet.make(tmp_path_factory.mktemp("tokens"), "alice", "bob")
    with serving(engine, tokens=tokens) as served:
        yield served


@pytest.fixture(scope="module")
def limited_server(engine: OwnedSandboxes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Tokens from a file (alice); one allowed Origin, and bodies of at most `BODY_LIMIT` bytes."""
    tokens = TokenSet.make(tmp_path_factory.mktemp("limited"), "alice")
    with serving(
        engine,
        tokens=tokens,
        CODOMYRMEX_SANDBOX_HTTP_ALLOWED_ORIGINS=json.dumps([ALLOWED]),
        CODOMYRMEX_SANDBOX_HTTP_MAX_BODY_BYTES=str(BODY_LIMIT),
    ) as served:
        yield served


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    with jwks_served() as served:
        yield served


@pytest.fixture(scope="module")
def jwt_server(engine: OwnedSandboxes, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """JWTs from `issuer`, and a tokens file (dave) as well."""
    tokens = TokenSet.make(tmp_path_factory.mktemp("jwt"), "dave")
    with serving(
        engine,
        tokens=tokens,
        CODOMYRMEX_SANDBOX_AUTH_JWT_ISSUER=ISSUER,
        CODOMYRMEX_SANDBOX_AUTH_JWT_AUDIENCE=AUDIENCE,
        CODOMYRMEX_SANDBOX_AUTH_JWKS_URL=issuer.jwks_url,
    ) as served:
        yield served


@pytest.fixture(scope="module")
def reload_server(engine: OwnedSandboxes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Tokens from a file (alice) that the tests change while the server runs."""
    tokens = TokenSet.make(tmp_path_factory.mktemp("reload"), "alice")
    with serving(engine, tokens=tokens) as served:
        yield served


@pytest.fixture(scope="module")
def open_server(engine: OwnedSandboxes) -> Iterator[Served]:
    """``--insecure-no-auth`` on loopback: no token needed, everyone is ``anonymous``."""
    with serving(engine, "--insecure-no-auth") as served:
        yield served


# -- 1. the MCP SDK's client with a token ------------------------------------------------------


async def test_the_sdk_client_with_a_token_lists_the_tools(token_server: Served) -> None:
    async with token_server.server.client(token_server.token("alice")) as client:
        with anyio.fail_after(QUICK):
            listing = await client.list_tools()

    assert {tool.name for tool in listing.tools} == TOOLS


async def test_the_sdk_client_with_a_token_runs_a_call_audited_under_its_principal(token_server: Served) -> None:
    result, audit = await run_as(token_server, token_server.token("alice"))

    assert result["status"] == "success"
    assert result["stdout"] == "42\n"
    assert audit["principal"] == "alice"
    assert audit["status"] == "success"
    started = [
        r for r in token_server.server.events("audit.execution_started") if r["execution_id"] == audit["execution_id"]
    ]
    assert [record["principal"] for record in started] == ["alice"]


# -- 2. refusals without a valid bearer token --------------------------------------------------


REFUSED: dict[str, Callable[[str], tuple[dict[str, str], str]]] = {
    # each: the headers and the query string of a request made with (or around) alice's valid token
    "no-authorization": lambda _token: ({}, ""),
    "wrong-token": lambda _token: ({"Authorization": f"Bearer {WRONG_TOKEN}"}, ""),
    "basic-scheme": lambda token: (
        {"Authorization": "Basic " + base64.b64encode(f"alice:{token}".encode()).decode()},
        "",
    ),
    "basic-scheme-with-the-token": lambda token: ({"Authorization": f"Basic {token}"}, ""),
    "bearer-without-a-token": lambda _token: ({"Authorization": "Bearer"}, ""),
    "trailing-garbage": lambda token: ({"Authorization": f"Bearer {token}x"}, ""),
    "trailing-word": lambda token: ({"Authorization": f"Bearer {token} extra"}, ""),
    "truncated": lambda token: ({"Authorization": f"Bearer {token[:-1]}"}, ""),
    "token-scheme-only": lambda token: ({"Authorization": token}, ""),
    "query-parameter": lambda token: ({}, f"?access_token={token}"),
}


@pytest.mark.parametrize("variant", list(REFUSED))
async def test_a_request_without_a_valid_bearer_token_is_refused_with_the_challenge(
    token_server: Served, variant: str
) -> None:
    headers, query = REFUSED[variant](token_server.token("alice"))

    response = await initialize(token_server.server, path=f"/mcp{query}", **headers)

    assert_invalid_token(response, token_server.server)


@pytest.mark.parametrize("value", ["Bearer ", "Bearer   ", "Bearer \t"])
async def test_a_bearer_header_with_only_white_space_is_refused(token_server: Served, value: str) -> None:
    # HTTP libraries refuse to send a header value with trailing white space; a hostile client does.
    body = json.dumps(INITIALIZE).encode()
    head = post_head(None, f"Authorization: {value}", f"Content-Length: {len(body)}")

    response = await raw_request(token_server.server, head, [body])

    assert_invalid_token(response, token_server.server)


async def test_the_same_request_with_the_token_is_served(token_server: Served) -> None:
    response = await initialize(token_server.server, token_server.token("bob"))

    assert_served(response)


async def test_the_challenge_points_at_the_protected_resource_metadata(token_server: Served) -> None:
    server = token_server.server
    refused = await initialize(server)
    found = re.search(r'resource_metadata="([^"]+)"', refused.headers["www-authenticate"])
    assert found is not None

    async with server.http() as http:  # no token: a client reads these before it has one
        documents = [(await http.get(url)) for url in (found.group(1), f"{server.base}{WELL_KNOWN}")]

    for response in documents:
        assert response.status_code == 200, response.text
        assert response.json() == {
            "resource": server.url,
            "bearer_methods_supported": ["header"],
            "resource_name": "codomyrmex-sandbox",
        }


# -- 3. JWTs -----------------------------------------------------------------------------------


async def test_a_jwt_from_the_issuer_runs_a_call_audited_under_its_sub(jwt_server: Served, issuer: Issuer) -> None:
    token = jwt_server.sending(issuer.token(sub="carol"))

    result, audit = await run_as(jwt_server, token)

    assert result["stdout"] == "42\n"
    assert audit["principal"] == "carol"


async def test_an_es256_jwt_from_the_issuer_is_accepted(jwt_server: Served, issuer: Issuer) -> None:
    token = jwt_server.sending(issuer.token(key=issuer.ec_key, kid=EC_KID, algorithm="ES256", sub="erin"))

    response = await initialize(jwt_server.server, token)

    assert_served(response)


@pytest.mark.parametrize("forgery", list(FORGED))
async def test_a_jwt_that_does_not_verify_is_refused(jwt_server: Served, issuer: Issuer, forgery: str) -> None:
    token = jwt_server.sending(FORGED[forgery](issuer))

    response = await initialize(jwt_server.server, token)

    assert_invalid_token(response, jwt_server.server)


async def test_made_up_kids_do_not_make_the_server_fetch_the_jwks_again_and_again(
    jwt_server: Served, issuer: Issuer
) -> None:
    # An unknown kid may be a key the issuer just added, so the server fetches the set again, but at
    # most every 30 s: a stream of made-up kids must not turn it into a client hammering the issuer.
    before = issuer.fetches
    for number in range(8):
        token = jwt_server.sending(issuer.token(key=issuer.rogue_key, kid=f"made-up-{number}"))
        assert_invalid_token(await initialize(jwt_server.server, token), jwt_server.server)

    assert issuer.fetches >= 1  # the server did fetch the set (this counter sees it)
    assert issuer.fetches - before <= 1


async def test_a_jwt_and_a_tokens_file_token_work_side_by_side(jwt_server: Served, issuer: Issuer) -> None:
    from_file = await run_as(jwt_server, jwt_server.token("dave"))
    from_issuer = await run_as(jwt_server, jwt_server.sending(issuer.token(sub="carol")))

    assert [result["stdout"] for result, _ in (from_file, from_issuer)] == ["42\n", "42\n"]
    assert [audit["principal"] for _, audit in (from_file, from_issuer)] == ["dave", "carol"]


async def test_the_metadata_of_a_jwt_server_names_its_issuer(jwt_server: Served) -> None:
    async with jwt_server.server.http() as http:
        response = await http.get(WELL_KNOWN)

    assert response.status_code == 200
    assert response.json()["authorization_servers"] == [ISSUER]
    assert response.json()["resource"] == jwt_server.server.url


# -- 4. Origin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [EVIL, "null"])
async def test_a_request_from_a_foreign_origin_is_forbidden_even_with_a_token(
    token_server: Served, origin: str
) -> None:
    token = token_server.token("alice")
    server = token_server.server

    refused = await initialize(server, token, Origin=origin)
    async with server.http(token, headers={"Origin": origin}) as http:
        metrics = await http.get("/metrics")
        health = await http.get("/healthz")

    for response in (refused, metrics, health):
        assert_forbidden_origin(response)


async def test_a_request_without_an_origin_is_served(token_server: Served) -> None:
    token = token_server.token("alice")

    response = await initialize(token_server.server, token)
    async with token_server.server.http(token) as http:
        metrics = await http.get("/metrics")

    assert_served(response)
    assert metrics.status_code == 200
    assert "codomyrmex_sandbox_running_executions" in metrics.text


async def test_an_allowed_origin_is_served(limited_server: Served) -> None:
    token = limited_server.token("alice")

    response = await initialize(limited_server.server, token, Origin=ALLOWED)
    async with limited_server.server.http(token, headers={"Origin": ALLOWED}) as http:
        metrics = await http.get("/metrics")

    assert_served(response)
    assert metrics.status_code == 200


@pytest.mark.parametrize(
    "origin",
    [EVIL, f"{ALLOWED}.evil.example", "http://ok.example", f"{ALLOWED}:8443", f"{ALLOWED}/", "null"],
)
async def test_only_the_exact_allowed_origin_passes(limited_server: Served, origin: str) -> None:

    response = await initialize(limited_server.server, limited_server.token("alice"), Origin=origin)

    assert_forbidden_origin(response)


# -- 5. body size ------------------------------------------------------------------------------


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(limited_server: Served) -> None:
    # The headers promise 1 MB and nothing follows: only a server that decides on the declared
    # length answers (one that reads first would wait for the body, past the deadline).
    head = post_head(limited_server.token("alice"), f"Content-Length: {1024 * 1024}")

    response = await raw_request(limited_server.server, head)

    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(limited_server: Served) -> None:
    # One byte over the limit, then the body stalls (no last chunk): the answer must not wait for it.
    head = post_head(limited_server.token("alice"), "Transfer-Encoding: chunked")
    parts = [chunk(b"[" * 16384) for _ in range(BODY_LIMIT // 16384)] + [chunk(b" ")]

    response = await raw_request(limited_server.server, head, parts)

    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


@pytest.mark.parametrize("sent", ["content-length", "chunked"])
async def test_a_client_sending_a_megabyte_reads_the_413(limited_server: Served, sent: str) -> None:
    # An HTTP client writes the whole body before it reads the answer. A server that answers and
    # closes at once, with the rest of the body unread, makes its kernel reset the connection, and
    # the reset discards the 413 that the client has not read yet (the "TCP reset problem" of RFC 9112,
    # section 9.6): the client sees a broken connection instead of the reason. Once is luck either
    # way, so five times in a row.
    body = padded_initialize(1024 * 1024)
    answers: list[tuple[int, str] | str] = []
    for _ in range(5):
        async with limited_server.server.http(limited_server.token("alice"), headers=MCP_HEADERS) as http:
            try:
                with anyio.fail_after(QUICK):
                    response = await http.post("/mcp", content=body if sent == "content-length" else chunks_of(body))
            except httpx2.TransportError as exc:
                answers.append(f"{type(exc).__name__} (the connection was reset before the answer was read)")
            else:
                assert ("content-length" in response.request.headers) == (sent == "content-length")
                answers.append((response.status_code, response.json().get("error", "")))

    assert answers == [(413, "body_too_large")] * 5


async def test_without_a_token_an_oversized_body_is_refused_as_unauthorized(limited_server: Served) -> None:
    declared = await raw_request(limited_server.server, post_head(None, f"Content-Length: {1024 * 1024}"))
    async with limited_server.server.http(headers=MCP_HEADERS) as http:
        with anyio.fail_after(QUICK):
            chunked = await http.post("/mcp", content=chunks_of(padded_initialize(1024 * 1024)))

    assert_invalid_token(declared, limited_server.server)
    assert_invalid_token(chunked, limited_server.server)


@pytest.mark.parametrize("sent", ["content-length", "chunked"])
@pytest.mark.parametrize(("size", "status"), [(BODY_LIMIT, 200), (BODY_LIMIT + 1, 413)])
async def test_a_body_at_the_limit_is_served_and_one_byte_more_is_not(
    limited_server: Served, sent: str, size: int, status: int
) -> None:
    body = padded_initialize(size)
    async with limited_server.server.http(limited_server.token("alice"), headers=MCP_HEADERS) as http:
        with anyio.fail_after(QUICK):
            response = await http.post("/mcp", content=body if sent == "content-length" else chunks_of(body))
            await end_session(http, response)

    assert response.status_code == status, response.text[:300]
    if status == 200:
        assert_served(response)
    else:
        assert response.json()["error"] == "body_too_large"


# -- 6. start-up refusals ----------------------------------------------------------------------


def orphaned_sandboxes(engine: OwnedSandboxes) -> set[str]:
    """This host's sandbox containers whose server process is gone."""
    found = engine.api.containers(all=True, filters={"label": f"{MANAGED}=true"})
    return {
        container["Id"]
        for container in found
        if (labels := container.get("Labels") or {}).get(OWNER_HOST) == engine.host
        and not process_alive(int(labels.get(OWNER_PID, "0")))
    }


@contextmanager
def no_new_orphans(engine: OwnedSandboxes) -> Iterator[None]:
    """A server that refused to start left no sandbox behind (it may have opened the engine first)."""
    before = orphaned_sandboxes(engine)
    yield
    left = orphaned_sandboxes(engine) - before
    assert not left, f"a server that refused to start left sandboxes behind: {sorted(left)}"


def test_without_authentication_the_server_refuses_to_start_and_says_how_to_configure_it(
    engine: OwnedSandboxes,
) -> None:
    with no_new_orphans(engine):
        completed = start_refused("--port", "0")

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "auth_tokens_file" in completed.stderr
    assert "--insecure-no-auth" in completed.stderr
    assert "http_listening" not in completed.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])  # noqa: S104 - the refusal is the point
def test_insecure_no_auth_on_a_non_loopback_address_is_refused(engine: OwnedSandboxes, host: str) -> None:
    with no_new_orphans(engine):
        completed = start_refused("--host", host, "--port", "0", "--insecure-no-auth")

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "loopback" in completed.stderr
    assert "http_listening" not in completed.stderr


def test_a_non_loopback_address_without_authentication_is_refused(engine: OwnedSandboxes) -> None:
    with no_new_orphans(engine):
        completed = start_refused("--host", "0.0.0.0", "--port", "0")  # noqa: S104 - the refusal is the point

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "auth_tokens_file" in completed.stderr
    assert "http_listening" not in completed.stderr


@pytest.mark.parametrize("pasted", ["name-and-token", "token-alone"])
def test_a_tokens_file_holding_a_token_instead_of_its_hash_is_refused_without_echoing_it(
    engine: OwnedSandboxes, tmp_path: Path, pasted: str
) -> None:
    token, good_line = new_token("alice")
    bad_line = f"bob {token}" if pasted == "name-and-token" else token
    path = tmp_path / "tokens.txt"
    path.write_text(f"# the operator pasted a token\n{good_line}\n{bad_line}\n", encoding="utf-8")

    with no_new_orphans(engine):
        completed = start_refused("--port", "0", env={"CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE": str(path)})

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert f"{path}, line 3" in completed.stderr
    assert "http_listening" not in completed.stderr
    assert_not_logged(completed.stderr + completed.stdout, [token])


# -- 7. --insecure-no-auth ---------------------------------------------------------------------


async def test_insecure_no_auth_serves_without_a_token_as_anonymous(open_server: Served) -> None:
    response = await initialize(open_server.server)
    result, audit = await run_as(open_server, None)

    assert_served(response)
    assert result["stdout"] == "42\n"
    assert audit["principal"] == "anonymous"


async def test_insecure_no_auth_has_no_protected_resource_metadata(open_server: Served) -> None:
    async with open_server.server.http() as http:
        responses = [await http.get(f"{WELL_KNOWN}{suffix}") for suffix in ("", "/mcp")]

    assert [response.status_code for response in responses] == [404, 404]


# -- 8. the tokens file is read again when it changes ------------------------------------------


def new_token_appended(path: Path, name: str) -> str:
    """``auth new-token NAME --append FILE`` through the console script, as an operator runs it: the token."""
    completed = subprocess.run(
        [console_script(), "auth", "new-token", name, "--append", str(path)],
        capture_output=True,
        text=True,
        env=server_environment(),
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    token, line = completed.stdout.splitlines()
    assert re.fullmatch(rf"{name} [0-9a-f]{{64}}", line), line
    assert path.read_text(encoding="utf-8").splitlines()[-1] == line
    return token


async def test_a_token_appended_to_the_file_works_without_a_restart(reload_server: Served) -> None:
    token = reload_server.sending(new_token_appended(reload_server.tokens_file, "frank"))

    result, audit = await run_as(reload_server, token)

    assert result["stdout"] == "42\n"
    assert audit["principal"] == "frank"
    assert len(reload_server.server.events("http_listening")) == 1  # the same server, not restarted


async def test_a_line_removed_from_the_file_revokes_its_token_without_a_restart(reload_server: Served) -> None:
    path = reload_server.tokens_file
    kept = path.read_text(encoding="utf-8")
    token = reload_server.sending(new_token_appended(path, "grace"))
    assert_served(await initialize(reload_server.server, token))

    path.write_text(kept, encoding="utf-8")

    assert_invalid_token(await initialize(reload_server.server, token), reload_server.server)
    assert_served(await initialize(reload_server.server, reload_server.token("alice")))


async def test_a_broken_file_keeps_the_last_good_tokens_and_is_not_echoed(reload_server: Served) -> None:
    path = reload_server.tokens_file
    kept = path.read_text(encoding="utf-8")
    pasted = reload_server.sending(new_token("henry")[0])
    try:
        path.write_text(f"{kept}henry {pasted}\n", encoding="utf-8")
        still = await initialize(reload_server.server, reload_server.token("alice"))
        pasted_refused = await initialize(reload_server.server, pasted)
    finally:
        path.write_text(kept, encoding="utf-8")

    assert_served(still)
    assert_invalid_token(pasted_refused, reload_server.server)
    assert reload_server.server.events("tokens_file_unreadable")
    assert_not_logged(reload_server.server.stderr(), [pasted])


# -- 9. no token is ever logged ----------------------------------------------------------------


async def test_no_file_token_reaches_the_log(token_server: Served) -> None:
    server, token = token_server.server, token_server.token("alice")

    await run_as(token_server, token)
    for variant in REFUSED.values():
        headers, query = variant(token)
        assert (await initialize(server, path=f"/mcp{query}", **headers)).status_code == 401
    assert (await initialize(server, token, Origin=EVIL)).status_code == 403
    async with server.http(token) as http:
        assert (await http.get("/metrics")).status_code == 200

    assert_not_logged(server.stderr(), token_server.secrets())


async def test_no_jwt_reaches_the_log(jwt_server: Served, issuer: Issuer) -> None:
    await run_as(jwt_server, jwt_server.sending(issuer.token(sub="carol")))
    for forge in FORGED.values():
        assert (await initialize(jwt_server.server, jwt_server.sending(forge(issuer)))).status_code == 401

    assert jwt_server.server.events("jwt_refused")  # refusals are logged, with their reason only
    assert_not_logged(jwt_server.server.stderr(), jwt_server.secrets())


# -- 10. a third-party client: the MCP Inspector over HTTP -------------------------------------


def inspector(url: str, *arguments: str) -> dict[str, Any]:
    """The MCP Inspector CLI against ``url`` over streamable HTTP: its JSON output."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail("npx is not installed; the MCP Inspector test needs Node.js and npm (e.g. `apt-get install npm`)")
    command = [npx, "-y", "@modelcontextprotocol/inspector", "--cli", url, "--transport", "http", *arguments]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=NPX_TIMEOUT, env=dict(os.environ), check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    output: dict[str, Any] = json.loads(completed.stdout)
    return output


def test_the_mcp_inspector_lists_the_tools_over_http(open_server: Served) -> None:
    output = inspector(open_server.server.url, "--method", "tools/list")

    assert {tool["name"] for tool in output["tools"]} == TOOLS


def test_the_mcp_inspector_calls_execute_code_over_http(open_server: Served) -> None:
    output = inspector(
        open_server.server.url, "--method", "tools/call", "--tool-name", "execute_code", "--tool-arg", "code=print(6*7)"
    )

    assert output["isError"] is False
    assert output["structuredContent"]["status"] == "success"
    assert output["structuredContent"]["stdout"] == "42\n"
    assert audit_end(open_server.server, output["structuredContent"]["execution_id"])["principal"] == "anonymous"

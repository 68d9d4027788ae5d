"""The HTTP transport under attack (HTTP-01 to HTTP-06): hostile clients of ``serve --transport http``.

Anyone who can reach the port can open connections and send bytes; only a token holder can run
code. These attacks come from both: clients that hold a connection or a request open without
finishing it, that never read what they asked for, that open connections by the hundred, that
send malformed JSON-RPC, or that play with the ``Authorization`` header. Each must be answered
(an HTTP status or a JSON-RPC error, never a 5xx, never a hang) without taking an execution slot
it has no right to, without growing the server without bound, and without keeping other
principals from running code; no token, nor any part of one, may ever reach the server's logs.

The servers are real subprocesses (`tests.http_support.http_server`) running real sandboxes, and
the hostile clients are raw sockets where an HTTP library would refuse to misbehave.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http_support import HttpServer, TokenSet, http_server
from tests.support import ACTIVE_SERVERS, CALL_DEADLINE, TOOL, describe, rss_kib, text_of

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("host_is_clean")]

MIB = 1024 * 1024
REQUEST_TIMEOUT = 3.0  # http_request_timeout_seconds of the servers here
TIMEOUT_MARGIN = 4.0  # how late after REQUEST_TIMEOUT a 408 (or a closed connection) may come
ANSWER_DEADLINE = 10.0  # every request here is answered within this, or the server hangs on it
SETTINGS = {
    "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": "8",
    "CODOMYRMEX_SANDBOX_HTTP_REQUEST_TIMEOUT_SECONDS": f"{REQUEST_TIMEOUT:g}",
}
PROTOCOL = "2025-06-18"
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "codomyrmex-http-attacks", "version": "0"},
    },
}
REFUSED = {0, 400, 401, 431}  # 0: the server closed the connection without an answer

# Every server of this module and the tokens it admits: HTTP-06 searches all their logs.
SERVED: list[tuple[HttpServer, TokenSet]] = []


# -- servers ----------------------------------------------------------------------------------


def secrets_of(tokens: TokenSet) -> list[str]:
    """What must never be logged: each token, and its first 12 characters (prefix and 8 random ones)."""
    return [part for token in tokens.tokens.values() for part in (token, token[:12])]


def assert_no_secret(text: str, tokens: TokenSet, where: str) -> None:
    for secret in secrets_of(tokens):
        assert secret not in text, f"a bearer token (or its first 12 characters) is in {where}"


@contextmanager
def serving(engine, tokens: TokenSet, **env: str) -> Iterator[HttpServer]:
    """An HTTP server whose sandboxes count as the suite's; on exit (SIGTERM, exit 0) none may remain
    and its logs must hold no token."""
    with http_server(tokens=tokens, env={**SETTINGS, **env}) as server:
        pid = server.process.pid
        engine.owners.add(pid)
        ACTIVE_SERVERS.add(pid)
        SERVED.append((server, tokens))
        try:
            yield server
        finally:
            ACTIVE_SERVERS.discard(pid)
    deadline = time.monotonic() + 10  # as long as a stdio server's are given (a removal may be in flight)
    while (left := engine.containers(owners={pid})) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"the stopped server left sandboxes behind: {describe(left)}"
    assert_no_secret(server.stderr(), tokens, "the server's logs")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenSet:
    return TokenSet.make(tmp_path_factory.mktemp("tokens"), "alice", "bob", "mallory")


@pytest.fixture(scope="module")
def web(engine, tokens: TokenSet) -> Iterator[HttpServer]:
    """The module's server: 8 slots, bodies due within REQUEST_TIMEOUT, 512 connections."""
    with serving(engine, tokens) as server:
        yield server


@pytest.fixture(scope="module")
def web20(engine, tokens: TokenSet) -> Iterator[HttpServer]:
    """A server that takes at most 20 connections at once."""
    with serving(engine, tokens, CODOMYRMEX_SANDBOX_HTTP_MAX_CONNECTIONS="20") as server:
        yield server


# -- clients ----------------------------------------------------------------------------------


async def run(server: HttpServer, token: str, code: str, *, within: float = CALL_DEADLINE) -> dict[str, Any]:
    """execute_code through the MCP SDK's own client; the call must run and succeed."""
    with anyio.fail_after(within):
        async with server.client(token) as mcp:
            result = await mcp.call_tool(TOOL, {"code": code, "timeout_seconds": 20})
    assert not result.is_error, f"the call did not run: {text_of(result)}"
    structured = result.structured_content
    assert structured is not None and structured["status"] == "success", structured
    return structured


async def open_session(http: httpx2.AsyncClient) -> dict[str, str]:
    """Initialize an MCP session by hand; the headers every later request of it carries."""
    answer = await http.post("/mcp", headers=MCP_HEADERS, json=INITIALIZE)
    assert answer.status_code == 200, answer.text[:300]
    headers = {**MCP_HEADERS, "Mcp-Session-Id": answer.headers["mcp-session-id"], "Mcp-Protocol-Version": PROTOCOL}
    initialized = await http.post(
        "/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"}
    )
    assert initialized.status_code == 202, initialized.text[:300]
    return headers


def rpc_messages(answer: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer: its JSON body, or each ``data:`` line of its event stream."""
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        lines = answer.text.splitlines()
        return [json.loads(line.removeprefix("data:")) for line in lines if line.startswith("data:")]
    try:
        message = json.loads(answer.content)
    except ValueError:
        return []
    return message if isinstance(message, list) else [message]


async def metrics(server: HttpServer, token: str) -> dict[str, float]:
    """The server's metrics, by sample name with its labels (``name{a="x"}``)."""
    async with server.http(token, timeout=ANSWER_DEADLINE) as http:
        answer = await http.get("/metrics")
    assert answer.status_code == 200, answer.text[:300]
    values = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


async def wait_until_idle(server: HttpServer, token: str, *, within: float) -> None:
    """Until /metrics says no execution runs and none waits."""
    deadline = time.monotonic() + within
    while True:
        now = await metrics(server, token)
        if now["codomyrmex_sandbox_running_executions"] == 0 and now["codomyrmex_sandbox_queue_depth"] == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"executions still run or wait {within} s later: {now}")
        await anyio.sleep(0.1)


async def ended_for(server: HttpServer, principal: str, *, within: float) -> dict[str, Any]:
    """The first audit.execution record of ``principal``, once the server has written it."""
    deadline = time.monotonic() + within
    while True:
        for record in server.events("audit.execution"):
            if record.get("principal") == principal:
                return record
        if time.monotonic() > deadline:
            pytest.fail(f"no execution of {principal} ended within {within} s")
        await anyio.sleep(0.1)


def started_by(server: HttpServer, principal: str) -> list[dict[str, Any]]:
    return [r for r in server.events("audit.execution_started") if r.get("principal") == principal]


# -- raw sockets ------------------------------------------------------------------------------


@dataclass
class Answer:
    """An HTTP answer read off a raw socket. ``status`` 0: none came (the connection closed, or the
    time ran out: ``closed`` says which)."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, *, within: float) -> Answer:
    """Read an answer and then on until the server closes the connection (or ``within`` runs out)."""
    deadline = time.monotonic() + within
    data, closed = b"", False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset: closed, whatever was read is the answer
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:  # closed without an answer, or (not closed) no answer within the time
        return Answer(0, {}, data, closed)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body, closed)


def post_head(path: str, header_lines: list[bytes], *, length: int | None) -> bytes:
    """A POST's request line and headers, byte for byte as given (plus the ones MCP needs)."""
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        *header_lines,
        b"Content-Type: application/json",
        b"Accept: application/json, text/event-stream",
        b"Connection: close",
        framing,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def raw_post(port: int, header_lines: list[bytes], body: bytes, *, within: float = ANSWER_DEADLINE) -> Answer:
    """POST ``body`` to /mcp with ``header_lines`` exactly as given; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        with contextlib.suppress(OSError):  # refused part way through a large header: read why
            sock.sendall(post_head("/mcp", header_lines, length=len(body)) + body)
        return read_answer(sock, within=within)


def session_lines(session: dict[str, str]) -> list[bytes]:
    """The MCP session's own headers (its id and protocol version), as raw header lines."""
    return [f"{name}: {value}".encode() for name, value in session.items() if name.startswith("Mcp-")]


def bearer(token: str | bytes) -> bytes:
    return b"Authorization: Bearer " + (token.encode() if isinstance(token, str) else token)


def server_side_unsent(server_port: int, client_port: int) -> int:
    """Bytes the server has written to one connection that its client has not taken (tx_queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
            return int(fields[4].split(":")[0], 16)
    return 0


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s resident-memory high-water mark (VmHWM), where the kernel allows it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- HTTP-01: a body that never finishes --------------------------------------------------------


@dataclass
class Trickled:
    answer: Answer
    after: float  # seconds from the end of the headers to the first byte of the answer
    sent: int  # body bytes sent by then


def trickle(port: int, head: bytes, body: bytes, *, chunked: bool, started: threading.Event) -> Trickled:
    """Send ``head`` at once, then ``body`` one byte a second until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE) as sock:
        sock.sendall(head)
        since = time.monotonic()
        sent = 0
        while sent < len(body) and time.monotonic() - since < REQUEST_TIMEOUT + 3 * TIMEOUT_MARGIN:
            readable, _, _ = select.select([sock], [], [], 0 if sent == 0 else 1.0)  # the pace: a byte a second
            if readable:
                after = time.monotonic() - since
                return Trickled(read_answer(sock, within=ANSWER_DEADLINE), after, sent)
            byte = body[sent : sent + 1]
            try:
                sock.sendall(b"1\r\n" + byte + b"\r\n" if chunked else byte)
            except OSError:
                break
            sent += 1
            started.set()
        after = time.monotonic() - since
        return Trickled(read_answer(sock, within=ANSWER_DEADLINE), after, sent)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_trickled_a_byte_a_second_gets_408_and_holds_no_slot(web, tokens, framing, measure):
    """HTTP-01: bob, with a valid token and session, sends a tools/call's headers and then its body
    one byte a second, to hold a request (and maybe an execution slot) open for as long as he likes.
    Within http_request_timeout_seconds (3 s here) he must get 408 and a closed connection, no
    execution may start for him, no slot may be held meanwhile, and alice's call runs."""
    async with web.http(tokens["bob"]) as http:
        session = await open_session(http)
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": TOOL, "arguments": {"code": "print(1)"}}}
    ).encode()
    lines = [bearer(tokens["bob"]), *session_lines(session)]
    head = post_head("/mcp", lines, length=None if framing == "chunked" else len(body))
    started = threading.Event()
    trickled: list[Trickled] = []

    async def trickler() -> None:
        trickled.append(
            await anyio.to_thread.run_sync(
                lambda: trickle(web.port, head, body, chunked=framing == "chunked", started=started)
            )
        )

    with anyio.fail_after(REQUEST_TIMEOUT + 3 * TIMEOUT_MARGIN + ANSWER_DEADLINE + CALL_DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(trickler)
            assert await anyio.to_thread.run_sync(started.wait, ANSWER_DEADLINE), "the trickle never started"
            during = await metrics(web, tokens["alice"])
            begun = time.monotonic()
            ran = await run(web, tokens["alice"], "print('alice ran')")
            measure("alice_call_seconds_during_the_trickle", round(time.monotonic() - begun, 3))

    [result] = trickled
    measure("answered_after_seconds", round(result.after, 3))
    measure("body_bytes_sent", result.sent)
    assert ran["stdout"] == "alice ran\n"
    assert during["codomyrmex_sandbox_running_executions"] == 0, "a half-sent body holds an execution slot"
    assert during["codomyrmex_sandbox_queue_depth"] == 0, "a half-sent body holds a queue place"
    assert result.answer.status == 408, result.answer
    assert result.answer.json()["error"] == "request_timeout"
    assert REQUEST_TIMEOUT - 0.5 <= result.after <= REQUEST_TIMEOUT + TIMEOUT_MARGIN, result.after
    assert result.answer.closed, "the connection stayed open after the 408"
    assert result.sent < len(body), "the whole body was sent: the attack did not happen"
    assert started_by(web, "bob") == [], "an execution started for the trickler"
    after = await metrics(web, tokens["alice"])
    assert after['codomyrmex_sandbox_refusals_total{reason="request_timeout"}'] >= 1
    await wait_until_idle(web, tokens["alice"], within=ANSWER_DEADLINE)


# -- HTTP-02: a client that never reads its event stream -----------------------------------------

FLOOD_MIB = 50
FLOOD = f"""
import sys, time
chunk = "x" * (1 << 20)
for _ in range({FLOOD_MIB}):
    sys.stdout.write(chunk)
sys.stdout.flush()
time.sleep(1)
print("flood over")
"""
# About 150 MiB of growth is the result itself, a reader or not: 50 MiB kept, copied to bytes and
# decoded, then sanitized. Queueing the stream for the non-reader as well would pass the bound.
RSS_BOUND_MIB = 200
BACKED_UP = 512 * 1024  # bytes the server must have stuck in the non-reader's connection


async def test_a_client_that_never_reads_its_event_stream_cannot_hold_a_slot_or_grow_the_server(
    engine, tokens, measure
):
    """HTTP-02: alice asks for progress on a call whose program writes 50 MiB to stdout (the
    output cap raised to 64 MiB so that it all flows), over a socket that never reads a byte, so
    that the server queues the stream for her in memory and keeps her call (and her slot) alive.
    The execution must end and free its slot (alice, allowed one at a time, runs another call),
    bob's call must run meanwhile, the server must grow by less than 200 MiB, and once the socket
    closes the server must serve as before."""
    with serving(
        engine,
        tokens,
        CODOMYRMEX_SANDBOX_MAX_OUTPUT_BYTES=str(64 * MIB),
        CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS_PER_PRINCIPAL="1",
    ) as server:
        pid = server.process.pid
        async with server.http(tokens["alice"]) as http:
            session = await open_session(http)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": TOOL,
                "arguments": {"code": FLOOD, "timeout_seconds": 90},
                "_meta": {"progressToken": 1},
            },
        }
        body = json.dumps(call).encode()
        lines = [bearer(tokens["alice"]), *session_lines(session)]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the backlog stays the server's
        hwm = reset_peak_rss(pid)
        before = rss_kib(pid)
        sampled = before
        try:
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(post_head("/mcp", lines, length=len(body)) + body)
            client_port = sock.getsockname()[1]

            # The stream backs up in the server's side of the connection: the client really is not reading.
            deadline = time.monotonic() + CALL_DEADLINE
            while server_side_unsent(server.port, client_port) < BACKED_UP:
                sampled = max(sampled, rss_kib(pid))
                if time.monotonic() > deadline:
                    pytest.fail(f"the event stream never backed up: {server_side_unsent(server.port, client_port)}")
                await anyio.sleep(0.05)
            measure("unsent_bytes_when_backed_up", server_side_unsent(server.port, client_port))

            bob = await run(server, tokens["bob"], "print('bob ran')")
            assert bob["stdout"] == "bob ran\n"

            record = await ended_for(server, "alice", within=120)
            assert record["status"] == "success", record
            assert record["stdout_bytes"] >= FLOOD_MIB * MIB, record
            await wait_until_idle(server, tokens["bob"], within=CALL_DEADLINE)
            sampled = max(sampled, rss_kib(pid))

            again = await run(server, tokens["alice"], "print('alice again')")  # her one slot is free
            assert again["stdout"] == "alice again\n"
            measure("unsent_bytes_at_the_end", server_side_unsent(server.port, client_port))
            peak = max(sampled, peak_rss_kib(pid) if hwm else 0)
        finally:
            sock.close()

        growth_mib = (peak - before) / 1024
        measure("rss_growth_mib", round(growth_mib, 1))
        measure("peak_from", "VmHWM" if hwm else "samples")
        assert growth_mib < RSS_BOUND_MIB, f"the server grew by {growth_mib:.0f} MiB for one non-reading client"

        async with server.http() as http:
            assert (await http.get("/healthz")).status_code == 200
        after = await run(server, tokens["bob"], "print('still serving')")
        assert after["stdout"] == "still serving\n"


# -- HTTP-03: connections by the hundred -------------------------------------------------------


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to ``port`` that send nothing, closed on exit."""
    sockets: list[socket.socket] = []
    try:
        # One at a time: those opened before a failure are in the list, and closed.
        sockets.extend(socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE) for _ in range(count))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def test_300_idle_connections_and_100_unauthenticated_posts_do_not_keep_a_token_holder_out(web, tokens, measure):
    """HTTP-03: an anonymous attacker opens 300 TCP connections that send nothing and fires 100
    unauthenticated POSTs at once, to crowd out the principals. Under the connection limit (512),
    every POST gets 401 and alice's call runs within 30 s."""
    statuses: list[int] = []

    async def anonymous(http: httpx2.AsyncClient) -> None:
        answer = await http.post("/mcp", headers=MCP_HEADERS, json=INITIALIZE)
        statuses.append(answer.status_code)

    with idle_connections(web.port, 300):
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=0)
        async with web.http(limits=limits, timeout=30) as http:
            begun = time.monotonic()
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(100):
                        tg.start_soon(anonymous, http)
                    ran = await run(web, tokens["alice"], "print('alice ran')", within=30)
            measure("seconds_for_alice_and_the_flood", round(time.monotonic() - begun, 3))

    assert ran["stdout"] == "alice ran\n"
    assert sorted(set(statuses)) == [401], f"unauthenticated POSTs were answered with {sorted(set(statuses))}"
    assert len(statuses) == 100


async def test_over_the_connection_limit_requests_get_503_and_the_server_recovers(web20, tokens):
    """HTTP-03: with http_max_connections 20, an attacker holds 20 connections; every further
    request (a probe, a token holder's call) must get 503 at once rather than wait or fail some
    other way, and once those connections close, the server must serve again."""
    with idle_connections(web20.port, 20):
        async with web20.http(tokens["alice"], timeout=ANSWER_DEADLINE) as http:
            with anyio.fail_after(ANSWER_DEADLINE):
                health = await http.get("/healthz")
                call = await http.post("/mcp", headers=MCP_HEADERS, json=INITIALIZE)
    assert health.status_code == 503, health.text[:200]
    assert call.status_code == 503, call.text[:200]

    deadline = time.monotonic() + ANSWER_DEADLINE
    async with web20.http() as http:
        while (await http.get("/healthz")).status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"the server still refuses {ANSWER_DEADLINE} s after the connections closed")
            await anyio.sleep(0.05)
    ran = await run(web20, tokens["alice"], "print('served again')")
    assert ran["stdout"] == "served again\n"


async def test_connections_that_never_finish_a_request_are_closed_so_they_cannot_hold_the_limit(web20, tokens):
    """HTTP-03 (slowloris): an attacker with no token holds every connection the server takes
    (20 here), half of them silent, half stopped in the middle of their request line or headers,
    to lock everyone out for as long as he keeps them open. The server must close them within
    http_request_timeout_seconds (and a margin), after which it serves again."""
    with idle_connections(web20.port, 20) as sockets:
        for sock in sockets[10:]:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
        deadline = time.monotonic() + REQUEST_TIMEOUT + TIMEOUT_MARGIN
        still_open = []
        for sock in sockets:
            answer = await anyio.to_thread.run_sync(
                lambda sock=sock: read_answer(sock, within=max(0.0, deadline - time.monotonic()))
            )
            if not answer.closed:
                still_open.append(sock)
        assert still_open == [], f"{len(still_open)} of 20 connections that never sent a request are still open"
        async with web20.http(timeout=ANSWER_DEADLINE) as http:
            assert (await http.get("/healthz")).status_code == 200


# -- HTTP-04: malformed JSON-RPC -----------------------------------------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000


def malformed(session: dict[str, str]) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(name, method, headers, body) of each malformed request, sent on a valid session."""

    def message(**fields: Any) -> bytes:
        return json.dumps({"jsonrpc": "2.0", **fields}).encode()

    tools_list = message(id=10, method="tools/list")
    return [
        ("not JSON", "POST", session, b"print('hello')"),
        ("truncated JSON", "POST", session, tools_list[: len(tools_list) // 2]),
        ("empty body", "POST", session, b""),
        ("a batch array", "POST", session, b"[" + tools_list + b"," + message(id=11, method="ping") + b"]"),
        ('jsonrpc "1.0"', "POST", session, json.dumps({"jsonrpc": "1.0", "id": 12, "method": "tools/list"}).encode()),
        ("no method", "POST", session, message(id=13)),
        ("unknown method", "POST", session, message(id=14, method="sandbox/escape")),
        ("params a list", "POST", session, message(id=15, method="tools/call", params=[TOOL, {"code": "print(1)"}])),
        ("params a string", "POST", session, message(id=16, method="tools/call", params="print(1)")),
        (
            "arguments a list",
            "POST",
            session,
            message(id=17, method="tools/call", params={"name": TOOL, "arguments": [1]}),
        ),
        ("tool name a number", "POST", session, message(id=18, method="tools/call", params={"name": 5})),
        ("10 000 nested arrays", "POST", session, DEEP),
        (
            "10 000 nested arrays in the arguments",
            "POST",
            session,
            b'{"jsonrpc":"2.0","id":19,"method":"tools/call","params":{"name":"execute_code","arguments":{"code":'
            + DEEP
            + b"}}}",
        ),
        ("10 000 nested objects", "POST", session, b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        (
            "invalid UTF-8",
            "POST",
            session,
            b'{"jsonrpc":"2.0","id":20,"method":"tools/list","params":{"x":"\xff\xfe\xc3"}}',
        ),
        (
            "invalid UTF-8 in the code",
            "POST",
            session,
            b'{"jsonrpc":"2.0","id":21,"method":"tools/call","params":{"name":"execute_code","arguments":{"code":"print(\'\xff\')"}}}',
        ),
        ("a number past any float", "POST", session, b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}'),
        ("Content-Type text/plain", "POST", {**session, "Content-Type": "text/plain"}, tools_list),
        ("no Accept for event streams", "POST", {**session, "Accept": "application/json"}, tools_list),
        ("an unknown Mcp-Session-Id", "POST", {**session, "Mcp-Session-Id": "0" * 32}, tools_list),
        ("an Mcp-Session-Id of 4 KiB", "POST", {**session, "Mcp-Session-Id": "a" * 4096}, tools_list),
        ("GET without a session", "GET", MCP_HEADERS, b""),
        ("DELETE without a session", "DELETE", MCP_HEADERS, b""),
        ("GET with an unknown session", "GET", {**MCP_HEADERS, "Mcp-Session-Id": "f" * 32}, b""),
        ("DELETE with an unknown session", "DELETE", {**MCP_HEADERS, "Mcp-Session-Id": "f" * 32}, b""),
        ("PUT", "PUT", session, tools_list),
    ]


async def test_malformed_json_rpc_is_answered_with_4xx_or_an_error_and_runs_nothing(web, tokens, measure):
    """HTTP-04: alice, with a valid token and session, sends JSON-RPC that is broken in every way
    the SDK's parser and the transport might trip on (not JSON, batches, wrong versions and types,
    nesting 10 000 deep, invalid UTF-8, wrong headers, unknown sessions). Each must be answered at
    once with a 4xx or a JSON-RPC error, never a 5xx or a hang; nothing may run; and the session
    and the server must work afterwards."""
    before = len(web.events("audit.execution_started"))
    answers = {}
    async with web.http(tokens["alice"], timeout=ANSWER_DEADLINE) as http:
        session = await open_session(http)
        for name, method, headers, body in malformed(session):
            begun = time.monotonic()
            with anyio.fail_after(ANSWER_DEADLINE):
                answer = await http.request(method, "/mcp", headers=headers, content=body)
            answers[name] = (answer.status_code, round(time.monotonic() - begun, 3))
            assert answer.status_code < 500, f"{name}: {answer.status_code} {answer.text[:300]}"
            if answer.status_code < 400:
                errors = [m for m in rpc_messages(answer) if "error" in m]
                assert answer.status_code == 200 and errors, f"{name}: {answer.status_code} {answer.text[:300]}"

        # The same session still works, as does a fresh client.
        listed = await http.post("/mcp", headers=session, json={"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
        assert listed.status_code == 200
        assert any(m.get("id") == 99 and "result" in m for m in rpc_messages(listed)), listed.text[:300]
    measure("answers", answers)
    assert len(web.events("audit.execution_started")) == before, "a malformed request started an execution"
    ran = await run(web, tokens["alice"], "print('well formed')")
    assert ran["stdout"] == "well formed\n"


# -- HTTP-05: the Authorization header ----------------------------------------------------------


async def principal_of(server: HttpServer, tokens: TokenSet, header_lines: list[bytes]) -> str | int:
    """Initialize an MCP session with ``header_lines``: the principal the session is bound to (found
    by whose token may use it), or the HTTP status that refused it."""
    body = json.dumps(INITIALIZE).encode()
    answer = await anyio.to_thread.run_sync(lambda: raw_post(server.port, header_lines, body))
    assert answer.status or answer.closed, f"{header_lines!r:.200}: no answer within {ANSWER_DEADLINE} s"
    assert answer.status < 500, f"{header_lines!r:.200}: {answer.status} {answer.body[:300]!r}"
    if answer.status != 200:
        assert "mcp-session-id" not in answer.headers
        return answer.status
    session = {**MCP_HEADERS, "Mcp-Session-Id": answer.headers["mcp-session-id"], "Mcp-Protocol-Version": PROTOCOL}
    owners = []
    for name, token in tokens.tokens.items():
        async with server.http(token, timeout=ANSWER_DEADLINE) as http:
            ping = await http.post("/mcp", headers=session, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
        if ping.status_code == 200:
            owners.append(name)
        else:
            assert ping.status_code == 404, ping.text[:300]
    assert len(owners) == 1, f"the session answers {owners}"
    return owners[0]


async def test_authorization_headers_that_are_not_exactly_a_token_authenticate_no_one(web, tokens, measure):
    """HTTP-05: mallory (whose own token is valid) and anonymous attackers send Authorization
    headers built to confuse the parsing: 64 KiB long, a valid token with more after it, NUL and
    newlines raw or escaped inside or after a valid token, the token file's hash of a valid token,
    other schemes. None may authenticate anyone, and each is answered without a 5xx."""
    alice = tokens["alice"].encode()
    digest = hashlib.sha256(alice).hexdigest().encode()
    basic = base64.b64encode(b"alice:" + alice)
    refused = {
        "64 KiB of token": [bearer(b"A" * 65536)],
        "a valid token, then 64 KiB": [bearer(alice + b"A" * 65536)],
        "a valid token, then one more character": [bearer(alice + b"A")],
        "a valid token less its last character": [bearer(alice[:-1])],
        "a raw NUL after a valid token": [bearer(alice + b"\x00")],
        "a raw NUL inside a valid token": [bearer(alice[:10] + b"\x00" + alice[10:])],
        "a raw CR inside a valid token": [bearer(alice[:10] + b"\r" + alice[10:])],
        "%00 after a valid token": [bearer(alice + b"%00")],
        "\\0 after a valid token": [bearer(alice + b"\\0")],
        "\\x00 after a valid token": [bearer(alice + b"\\x00")],
        "\\u0000 after a valid token": [bearer(alice + b"\\u0000")],
        "\\n after a valid token": [bearer(alice + b"\\n")],
        "%0A after a valid token": [bearer(alice + b"%0A")],
        "\\r\\n inside a valid token": [bearer(alice[:10] + b"\\r\\n" + alice[10:])],
        "the token's SHA-256 (the file's hex)": [bearer(digest)],
        "the token's SHA-256 in capitals": [bearer(digest.upper())],
        "the token file's line": [bearer(b"alice " + digest)],
        "Basic with the token as the password": [b"Authorization: Basic " + basic],
        "Token scheme": [b"Authorization: Token " + alice],
        "Bearer and no token": [b"Authorization: Bearer"],
        "Bearer and spaces": [b"Authorization: Bearer     "],
        "Bearer without a space": [b"Authorization: Bearer" + alice],
        "two credentials in one header": [b"Authorization: Bearer nope, Bearer " + alice],
        "the token in Proxy-Authorization": [b"Proxy-Authorization: Bearer " + alice],
        "the token in a cookie": [b"Cookie: access_token=" + alice],
        "a folded header line": [b"Authorization: Bearer nope", b" " + alice],
    }
    outcomes: dict[str, str | int] = {}
    for name, lines in refused.items():
        with anyio.fail_after(2 * ANSWER_DEADLINE):
            outcomes[name] = await principal_of(web, tokens, lines)
    measure("refused_with", outcomes)
    wrong = {name: outcome for name, outcome in outcomes.items() if outcome not in REFUSED}
    assert wrong == {}, f"these authenticated someone: {wrong}"


async def test_the_bearer_scheme_is_case_insensitive_and_two_headers_never_make_someone_else(web, tokens, measure):
    """HTTP-05: the scheme name is matched without regard to case (RFC 9110 section 11.1; the SDK's
    backend lower-cases it), so ``bearer`` and ``BEARER`` authenticate the token's owner. Two
    Authorization headers, valid and invalid in either order, or two principals' tokens, must never
    authenticate anyone but the principal of the first header, which is the one the server reads;
    blanks (Unicode whitespace too) around a token change nothing but never make it someone else's."""
    alice, bob = tokens["alice"].encode(), tokens["bob"].encode()
    exact = {
        "Bearer": [bearer(alice)],
        "bearer": [b"Authorization: bearer " + alice],
        "BEARER": [b"Authorization: BEARER " + alice],
        "bEaReR": [b"Authorization: bEaReR " + bob],
        "lower-case header name": [b"authorization: Bearer " + bob],
    }
    expected = {
        "Bearer": "alice",
        "bearer": "alice",
        "BEARER": "alice",
        "bEaReR": "bob",
        "lower-case header name": "bob",
    }
    first_or_refused = {
        "valid, then invalid": ([bearer(alice), bearer(b"nope")], "alice"),
        "invalid, then valid": ([bearer(b"nope"), bearer(alice)], None),
        "alice's, then bob's": ([bearer(alice), bearer(bob)], "alice"),
        "bob's, then alice's": ([bearer(bob), bearer(alice)], "bob"),
        "an empty one, then alice's": ([b"Authorization:", bearer(alice)], None),
        "alice's, then mallory's in lower case": (
            [bearer(alice), b"authorization: Bearer " + tokens["mallory"].encode()],
            "alice",
        ),
        "blanks around alice's": ([b"Authorization: Bearer  " + alice + b" " * 100], "alice"),
        "a no-break space after bob's": ([bearer(bob + b"\xa0")], "bob"),
        "a next-line character after bob's": ([bearer(bob + b"\x85")], "bob"),
    }
    outcomes: dict[str, str | int] = {}
    with anyio.fail_after(len(exact) * 2 * ANSWER_DEADLINE + len(first_or_refused) * 2 * ANSWER_DEADLINE):
        for name, lines in exact.items():
            outcomes[name] = await principal_of(web, tokens, lines)
        for name, (lines, _) in first_or_refused.items():
            outcomes[name] = await principal_of(web, tokens, lines)
    measure("outcomes", outcomes)
    for name, principal in expected.items():
        assert outcomes[name] == principal, f"{name}: {outcomes[name]}"
    for name, (_, first) in first_or_refused.items():
        assert outcomes[name] in REFUSED or outcomes[name] == first, f"{name}: authenticated as {outcomes[name]}"


# -- HTTP-06: no secret in the logs ---------------------------------------------------------------


async def test_no_token_nor_its_first_12_characters_is_ever_logged(web, tokens):
    """HTTP-06: an operator's logs go to more people than its tokens should. After this module's
    attacks, and a last round of near misses (alice's token with one character changed, in the
    query string, in a cookie, as a hostile Origin's credentials), no token of any server of this
    module, nor its first 12 characters, may appear in that server's logs."""
    alice = tokens["alice"]
    near = alice[:-1] + ("A" if alice[-1] != "A" else "B")
    async with httpx2.AsyncClient(base_url=web.base, timeout=ANSWER_DEADLINE) as http:
        attempts = [
            await http.post("/mcp", headers={**MCP_HEADERS, "Authorization": f"Bearer {near}"}, json=INITIALIZE),
            await http.post(f"/mcp?access_token={alice}", headers=MCP_HEADERS, json=INITIALIZE),
            await http.post("/mcp", headers={**MCP_HEADERS, "Cookie": f"token={alice}"}, json=INITIALIZE),
            await http.get("/metrics", headers={"Authorization": f"Bearer {near}"}),
            await http.post(
                "/mcp",
                headers={**MCP_HEADERS, "Authorization": f"Bearer {alice}", "Origin": "https://evil.example"},
                json=INITIALIZE,
            ),
        ]
    assert [a.status_code for a in attempts] == [401, 401, 401, 401, 403]
    near_miss = TokenSet(tokens.path, {"near": near})
    assert SERVED, "no server of this module ran"
    for server, admitted in SERVED:
        log = server.stderr()
        assert log, "the server wrote no log at all"
        assert_no_secret(log, admitted, "a server's logs")
        assert_no_secret(log, near_miss, "a server's logs")

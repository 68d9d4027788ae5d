"""Two replicas behind HAProxy, with deploy/haproxy.cfg as shipped (deploy/README.md).

The proxy terminates TLS (with a certificate made here) and the replicas listen on loopback with one
tokens file, as in production. The test changes only what must differ on a test machine: the ports,
the certificate, the stats socket's path, and the privilege lines when it does not run as root. The
clients are the MCP SDK's own, over streamable HTTP, through the proxy, with bearer tokens, in both
protocol eras: stateful (``initialize``, then ``Mcp-Session-Id`` on every request) and stateless
(``server/discover``, no session id). The proxy must keep a caller on one replica in either.

Which replica ran a call is read from the replicas' own audit records (`HttpServer.events`), by the
call's execution id or by the SHA-256 of its code. Every call prints a nonce of its own, so a result
that carries another call's output, or none, is caught.

HAProxy is required, not optional: without ``haproxy`` these tests fail with the command that
installs it (scripts/setup installs it).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import ipaddress
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from tests.http_support import HttpServer, TokenSet, http_server
from tests.support import CALL_DEADLINE, OwnedSandboxes, free_port, text_of

pytestmark = pytest.mark.docker

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
FIX_HAPROXY = "install it with `apt-get install -y haproxy` (scripts/setup does)"
PROXY_DEADLINE = 30.0  # HAProxy started and both replicas up by its health checks; a replica marked down
GRACE_SECONDS = 1  # the replicas' shutdown_grace_seconds
SLEEP_SECONDS = 5  # what the calls in flight sleep: longer than the grace, so the stopped replica cancels them
CONCURRENCY = 4  # each replica's max_concurrent_executions, whatever the machine


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(f"the load-balancer tests need HAProxy, which is not installed; {FIX_HAPROXY}.", pytrace=False)
    return found


# -- TLS: a CA of the test's own, and the proxy's certificate for 127.0.0.1 ------------------------


@dataclass(frozen=True)
class Certificate:
    pem: Path  # the proxy's certificate and key in one file, as HAProxy's "crt" takes them
    trust: ssl.SSLContext  # the clients verify the proxy against the CA


def make_certificate(directory: Path) -> Certificate:
    now = dt.datetime.now(dt.UTC)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=1)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "codomyrmex-sandbox test CA")])
    signing = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(signing, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = directory / "sandbox.pem"
    pem.touch(mode=0o600)
    pem.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    trust = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return Certificate(pem, trust)


# -- HAProxy, run with deploy/haproxy.cfg ----------------------------------------------------------


def render_config(*, port: int, pem: Path, replicas: list[HttpServer], stats: Path) -> str:
    """deploy/haproxy.cfg with this machine's ports and paths: each value it replaces must be on
    exactly one configuration line, so the file and the test cannot drift apart unnoticed."""
    replacements = {
        "bind :443 ssl crt /etc/haproxy/certs/sandbox.pem": f"bind 127.0.0.1:{port} ssl crt {pem}",
        "127.0.0.1:8001": f"127.0.0.1:{replicas[0].port}",
        "127.0.0.1:8002": f"127.0.0.1:{replicas[1].port}",
        "/run/haproxy/admin.sock": str(stats),
    }
    lines = CONFIG.read_text(encoding="utf-8").splitlines()
    for old, new in replacements.items():
        found = [i for i, line in enumerate(lines) if old in line and not line.lstrip().startswith("#")]
        assert len(found) == 1, f"deploy/haproxy.cfg must have {old!r} on one line, not {len(found)}"
        lines[found[0]] = lines[found[0]].replace(old, new)
    if os.geteuid() != 0:  # only root may change its user, group and root directory
        lines = [line for line in lines if line.split()[:1] not in (["user"], ["group"], ["chroot"])]
    return "\n".join(lines) + "\n"


@dataclass
class LoadBalancer:
    process: subprocess.Popen[bytes]
    port: int
    stats: Path  # the admin socket ("show stat")
    log: Path  # HAProxy's output: its request log and server state changes
    trust: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mcp"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy's health checks see it: "UP", "DOWN", "UP 1/2" (going down)..."""
        async with await anyio.connect_unix(str(self.stats)) as stream:
            await stream.send(b"show stat\n")
            chunks = []
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    chunks.append(await stream.receive())
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().removeprefix("# ")))
        return {row["svname"]: row["status"] for row in rows if row["svname"].startswith("replica")}

    async def wait_for_states(self, wanted: dict[str, str], *, within: float = PROXY_DEADLINE) -> None:
        """Until HAProxy says each named replica is in the wanted state; fails after ``within`` seconds."""
        deadline = time.monotonic() + within
        states: dict[str, str] = {}
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"HAProxy exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            with contextlib.suppress(OSError):  # the socket is not there yet
                states = await self.states()
            if all(states.get(name) == state for name, state in wanted.items()):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"HAProxy did not see {wanted} within {within} s (last: {states}):\n{self.output()[-4000:]}"
                )
            await anyio.sleep(0.05)

    def http(self, token: str | None = None) -> httpx2.AsyncClient:
        """An HTTPS client for the proxy, sending ``token`` as the bearer token when given."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx2.AsyncClient(
            base_url=f"https://127.0.0.1:{self.port}",
            headers=headers,
            verify=self.trust,
            timeout=CALL_DEADLINE,
            trust_env=False,  # no proxy from the environment between the test and HAProxy
        )

    @asynccontextmanager
    async def client(self, token: str, *, mode: str = "auto") -> AsyncIterator[Client]:
        """The MCP SDK's client through the proxy (``mode`` "legacy": the stateful protocol)."""
        async with (
            self.http(token) as http,
            Client(streamable_http_client(self.url, http_client=http), mode=mode) as mcp,
        ):
            yield mcp


@contextmanager
def load_balancer(
    directory: Path, *, port: int, certificate: Certificate, replicas: list[HttpServer]
) -> Iterator[LoadBalancer]:
    """HAProxy in the foreground with deploy/haproxy.cfg in front of ``replicas``; stopped on exit."""
    haproxy = haproxy_binary()
    with tempfile.TemporaryDirectory(prefix="cmx-lb-") as short:  # a socket path has at most 107 bytes
        config = directory / "haproxy.cfg"
        config.write_text(
            render_config(port=port, pem=certificate.pem, replicas=replicas, stats=Path(short) / "admin.sock"),
            encoding="utf-8",
        )
        checked = subprocess.run(
            [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30, check=False
        )
        assert checked.returncode == 0, f"HAProxy refuses deploy/haproxy.cfg:\n{checked.stdout}{checked.stderr}"
        log = directory / "haproxy.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [haproxy, "-f", str(config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield LoadBalancer(process, port, Path(short) / "admin.sock", log, certificate.trust)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # a hard stop: the test is over
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the deployment: two replicas and the proxy ---------------------------------------------------


@dataclass
class Deployment:
    proxy: LoadBalancer
    replicas: list[HttpServer]
    tokens: TokenSet

    def replica_of_execution(self, execution_id: str) -> int:
        """The index of the one replica whose audit log has this execution."""
        found = [
            i
            for i, replica in enumerate(self.replicas)
            if any(r.get("execution_id") == execution_id for r in replica.events("audit.execution"))
        ]
        assert len(found) == 1, f"execution {execution_id} is in the audit of replicas {found}, not one"
        return found[0]

    def replicas_of_code(self, code: str) -> list[int]:
        """The indexes of the replicas that started running ``code`` (by its SHA-256 in the audit)."""
        digest = hashlib.sha256(code.encode()).hexdigest()
        return [
            i
            for i, replica in enumerate(self.replicas)
            if any(r.get("code_sha256") == digest for r in replica.events("audit.execution_started"))
        ]

    async def wait_until_started(self, codes: list[str], *, within: float = CALL_DEADLINE) -> None:
        deadline = time.monotonic() + within
        while not all(self.replicas_of_code(code) for code in codes):
            if time.monotonic() > deadline:
                pytest.fail(f"not every call started within {within} s:\n{self.proxy.output()[-3000:]}")
            await anyio.sleep(0.05)


@asynccontextmanager
async def deployment(directory: Path, engine: OwnedSandboxes, principals: list[str]) -> AsyncIterator[Deployment]:
    """Two replicas (one tokens file with a token per principal, the proxy's https URL as their
    public URL) behind HAProxy, once its health checks see both up. Their sandboxes count as this
    test's, so the suite's fixture checks that none is left."""
    tokens = TokenSet.make(directory, *principals)
    certificate = make_certificate(directory)
    port = free_port()
    env = {
        "CODOMYRMEX_SANDBOX_HTTP_PUBLIC_URL": f"https://127.0.0.1:{port}/mcp",
        "CODOMYRMEX_SANDBOX_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
        "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": str(CONCURRENCY),
    }
    with ExitStack() as stack, ThreadPoolExecutor(2) as starting:
        # Both start at once (each waits for its own http_listening); each is stopped on exit.
        started = [starting.submit(stack.enter_context, http_server(tokens=tokens, env=env)) for _ in range(2)]
        replicas = [replica.result() for replica in started]
        for replica in replicas:
            engine.owners.add(replica.process.pid)
        proxy = stack.enter_context(load_balancer(directory, port=port, certificate=certificate, replicas=replicas))
        await proxy.wait_for_states({"replica1": "UP", "replica2": "UP"})
        yield Deployment(proxy, replicas, tokens)


def nonce_code(nonce: str, *, sleep: float = 0) -> str:
    prefix = f"import time\ntime.sleep({sleep})\n" if sleep else ""
    return f"{prefix}print({nonce!r})"


def stdout_of(result: CallToolResult) -> Any:
    assert not result.is_error, f"the call did not run: {text_of(result)}"
    assert result.structured_content is not None, f"no structured content: {text_of(result)}"
    return result.structured_content["stdout"]


# -- the tests ------------------------------------------------------------------------------------


async def test_connections_spread_over_both_replicas_and_each_stays_on_its_own(tmp_path, engine):
    """Eight callers (a principal each), in both protocol eras, two calls per connection: the callers
    are balanced over both replicas, every call of one caller runs on one replica, and every result
    is the caller's own."""
    principals = [f"agent{i}" for i in range(8)]
    async with deployment(tmp_path, engine, principals) as deployed:
        placed: dict[str, list[str]] = {}

        async def caller(principal: str, mode: str) -> None:
            async with deployed.proxy.client(deployed.tokens[principal], mode=mode) as mcp:
                for _ in range(2):
                    nonce = secrets.token_hex(12)
                    result = await mcp.call_tool("execute_code", {"code": nonce_code(nonce)})
                    assert stdout_of(result) == f"{nonce}\n", f"{principal} got another output"
                    placed.setdefault(principal, []).append(result.structured_content["execution_id"])

        with anyio.fail_after(2 * CALL_DEADLINE):
            async with anyio.create_task_group() as tg:
                for i, principal in enumerate(principals):
                    tg.start_soon(caller, principal, "legacy" if i % 2 else "auto")

            # The operational routes through the proxy: health, and the replicas describing
            # themselves by the proxy's https URL; metrics are per replica, so the proxy hides them.
            async with deployed.proxy.http() as anonymous, deployed.proxy.http(deployed.tokens["agent0"]) as agent:
                assert (await anonymous.get("/healthz")).status_code == 200
                refused = await anonymous.post("/mcp", json={})
                metadata = await anonymous.get("/.well-known/oauth-protected-resource")
                metrics = await agent.get("/metrics")
        assert refused.status_code == 401
        assert f'resource_metadata="https://127.0.0.1:{deployed.proxy.port}/' in refused.headers["www-authenticate"]
        assert metadata.json()["resource"] == deployed.proxy.url
        assert metrics.status_code == 404

    where = {principal: {deployed.replica_of_execution(e) for e in ids} for principal, ids in placed.items()}
    assert all(len(replicas) == 1 for replicas in where.values()), f"a caller's calls were split: {where}"
    counts = [sum(1 for replicas in where.values() if replicas == {i}) for i in range(2)]
    assert counts == [4, 4], f"callers per replica: {counts} (round robin over eight first requests)"
    principals_seen = {r["principal"] for replica in deployed.replicas for r in replica.events("audit.execution")}
    assert principals_seen == set(principals)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_session_is_reached_through_the_proxy_in_both_protocol_eras(tmp_path, engine, mode):
    """create_session's sandbox lives in one replica, and the caller's later calls reach it there. Round
    robin alone would send consecutive requests to alternate replicas: at least one of these calls
    would then find no session."""
    async with deployment(tmp_path, engine, ["alice"]) as deployed:
        with anyio.fail_after(2 * CALL_DEADLINE):
            async with deployed.proxy.client(deployed.tokens["alice"], mode=mode) as mcp:
                created = await mcp.call_tool("create_session", {"language": "python"})
                assert not created.is_error, text_of(created)
                assert created.structured_content is not None
                session_id = created.structured_content["session_id"]
                outputs = []
                for code in ["counter = 40", "counter += 1", "counter += 1", "print(counter)"]:
                    result = await mcp.call_tool("execute_code", {"code": code, "session_id": session_id})
                    outputs.append(stdout_of(result))
                closed = await mcp.call_tool("close_session", {"session_id": session_id})
                assert not closed.is_error, text_of(closed)
                assert closed.structured_content is not None
    assert outputs == ["", "", "", "42\n"]
    assert closed.structured_content["calls"] == 4
    sessions = [len(replica.events("audit.session_created")) for replica in deployed.replicas]
    assert sorted(sessions) == [0, 1], f"sessions created per replica: {sessions}"


async def test_a_replica_stopped_mid_run_fails_only_its_own_callers_and_new_callers_reach_the_other(tmp_path, engine):
    """Calls in flight on both replicas; SIGTERM to one (grace 1 s, the calls sleep 5 s). Its callers get
    an error (or, for a call that ends within the grace, their own output), never a result without
    their nonce; the other replica's callers all get their own output; the stopped replica exits 0
    leaving no sandbox; a caller it served before now reaches the other."""
    principals = [f"agent{i}" for i in range(6)]
    async with deployment(tmp_path, engine, principals) as deployed:
        proxy, first = deployed.proxy, deployed.replicas[0]
        outcomes: dict[str, CallToolResult | BaseException] = {}
        nonces = {principal: secrets.token_hex(12) for principal in principals}
        codes = {principal: nonce_code(nonce, sleep=SLEEP_SECONDS) for principal, nonce in nonces.items()}

        async def caller(principal: str, mode: str) -> None:
            try:
                async with proxy.client(deployed.tokens[principal], mode=mode) as mcp:
                    outcomes[principal] = await mcp.call_tool("execute_code", {"code": codes[principal]})
            except Exception as exc:  # noqa: BLE001 - a transport error is an acceptable outcome, and is recorded
                outcomes[principal] = exc

        with anyio.fail_after(2 * CALL_DEADLINE):
            async with anyio.create_task_group() as tg:
                for i, principal in enumerate(principals):
                    tg.start_soon(caller, principal, "legacy" if i % 2 else "auto")
                await deployed.wait_until_started(list(codes.values()))
                on = {principal: deployed.replicas_of_code(code) for principal, code in codes.items()}
                assert all(len(where) == 1 for where in on.values()), f"a call ran twice: {on}"
                on_first = [principal for principal, where in on.items() if where == [0]]
                assert on_first and len(on_first) < len(principals), f"the calls are not on both replicas: {on}"
                first.signal(signal.SIGTERM)  # once: a second signal would end the grace at once
            status = await anyio.to_thread.run_sync(partial(first.process.wait, timeout=CALL_DEADLINE))

        assert status == 0, f"the stopped replica exited with {status}"
        assert set(outcomes) == set(principals)
        failed = []
        for principal, outcome in outcomes.items():
            if isinstance(outcome, BaseException) or outcome.is_error:
                assert principal in on_first, f"{principal}, on the replica still running, failed: {outcome!r}"
                failed.append(principal)
                continue
            stdout = outcome.structured_content["stdout"] if outcome.structured_content else None
            assert stdout == f"{nonces[principal]}\n", f"{principal} got a success without its own output: {stdout!r}"
        # The calls still running after the grace were cancelled, and exactly their callers failed (a call
        # that started long before the signal, on a slow machine, may have finished within the grace).
        cancelled = [r for r in first.events("audit.execution") if r.get("status") == "cancelled"]
        assert cancelled, f"no call of the stopped replica was cancelled: {first.events('audit.execution')}"
        assert len(failed) == len(cancelled), f"callers failed: {failed}; calls cancelled: {len(cancelled)}"
        await engine.wait_until_gone(first.process.pid)

        # A caller that the stopped replica served now reaches the other: HAProxy retries the refused
        # connection there, or has marked the replica down already.
        moved = on_first[0]
        with anyio.fail_after(CALL_DEADLINE):
            async with proxy.client(deployed.tokens[moved]) as mcp:
                nonce = secrets.token_hex(12)
                result = await mcp.call_tool("execute_code", {"code": nonce_code(nonce)})
        assert stdout_of(result) == f"{nonce}\n"
        assert deployed.replica_of_execution(result.structured_content["execution_id"]) == 1
        await proxy.wait_for_states({"replica1": "DOWN", "replica2": "UP"})

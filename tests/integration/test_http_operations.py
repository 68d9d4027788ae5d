"""Operating the HTTP transport: principals, per-principal limits, audit, metrics, readiness, and the
graceful stop, against real servers (``serve --transport http`` subprocesses) and the real engine.

Programs that must stay running while a test looks at the server wait on a gate: a ``sleep`` with
a number of its own, which the test kills from the host when it is done looking (the program then
prints and ends normally). Nothing here sleeps to let something happen: the tests wait on the
server's own log lines, on results, or on the engine, each with a bound.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from prometheus_client.parser import text_string_to_metric_families

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.sessions import new_session_id
from tests.http_support import HttpServer, TokenSet, http_server
from tests.support import CALL_DEADLINE, host_processes, release, text_of

pytestmark = pytest.mark.docker

LANGUAGES = ("bash", "javascript", "python")
PREFIX = "codomyrmex_sandbox_"
REFUSED_AT_ONCE = 5.0  # a refusal takes no sandbox: even a loaded machine answers well within this
EXIT_DEADLINE = 60.0

Scraped = dict[tuple[str, frozenset[tuple[str, str]]], float]  # sample name and labels -> value


def gated(number: str, then: str = "print('done')") -> tuple[str, str]:
    """A Python program that waits on its gate (``sleep 60.<number>``) and then runs ``then``; and the gate."""
    gate = f"sleep 60.{number}"
    return f"import subprocess\nsubprocess.run({gate.split()!r})\n{then}", gate


async def open_gate(engine: Any, server: HttpServer, gate: str) -> None:
    """Kill the gate process of ``server``'s sandbox from the host: its program goes on."""
    container = await engine.wait_for_process(server.process.pid, gate)
    processes = await anyio.to_thread.run_sync(host_processes)
    found = [p for p in processes if p.container == container and p.cmdline == gate]
    assert found, f"the sandbox {container[:12]} runs {gate!r}, yet no host process of it does"
    for process in found:
        release(process)


@contextmanager
def serving(
    engine: Any, *args: str, tokens: TokenSet | None = None, env: dict[str, str] | None = None
) -> Iterator[HttpServer]:
    """`http_server`, with the server's sandboxes counted as this test's (none may outlive it)."""
    with http_server(*args, tokens=tokens, env=env) as server:
        engine.owners.add(server.process.pid)
        yield server


async def logged(server: HttpServer, name: str, *, count: int = 1, within: float = 30.0) -> list[dict[str, Any]]:
    """The records named ``name`` once there are at least ``count`` of them (waited for off the loop)."""
    return await anyio.to_thread.run_sync(partial(server.wait_for_event, name, within=within, count=count))


async def exited(server: HttpServer, *, within: float = EXIT_DEADLINE) -> int:
    """The server's exit status, once it has exited on its own (no further signal is sent)."""
    return await anyio.to_thread.run_sync(partial(server.process.wait, timeout=within))


async def tool(client: Client, name: str, arguments: dict[str, Any] | None = None) -> CallToolResult:
    with anyio.fail_after(CALL_DEADLINE):
        return await client.call_tool(name, arguments or {})


async def ran(client: Client, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tool's structured result, which must not be an error."""
    result = await tool(client, name, arguments)
    assert not result.is_error, text_of(result)
    structured: dict[str, Any] | None = result.structured_content
    assert structured is not None
    return structured


@asynccontextmanager
async def legacy_client(server: HttpServer, token: str) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    """An MCP client that opens an MCP session (the initialize handshake, ``mode="legacy"``), and what it
    was told: ``session`` (its Mcp-Session-Id) and ``version`` (the protocol version its requests name).

    The SDK's client speaks the per-request protocol by default, which has no Mcp-Session-Id at all.
    """
    seen: dict[str, str] = {}

    async def remember(response: httpx2.Response) -> None:
        if session := response.headers.get("mcp-session-id"):
            seen["session"] = session
        if version := response.request.headers.get("mcp-protocol-version"):
            seen["version"] = version

    async with (
        server.http(token, event_hooks={"response": [remember]}) as http,
        Client(streamable_http_client(server.url, http_client=http), mode="legacy") as mcp,
    ):
        yield mcp, seen


def samples(text: str) -> Scraped:
    """Every sample of a Prometheus text exposition, by sample name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for point in family.samples:
            found[point.name, frozenset(point.labels.items())] = point.value
    return found


def sample(scraped: Scraped, name: str, **labels: str) -> float | None:
    """One sample's value (``name`` without the prefix), or None when there is no such sample."""
    return scraped.get((PREFIX + name, frozenset(labels.items())))


async def scrape(server: HttpServer, token: str | None) -> Scraped:
    """GET /metrics (with ``token`` as the bearer token, when given), which must answer 200."""
    async with server.http(token) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


# -- principals -----------------------------------------------------------------------------------


async def test_a_principal_cannot_reach_another_principals_sessions_or_mcp_session(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice", "bob")
    made_up = new_session_id()
    with serving(engine, tokens=tokens) as server:
        async with legacy_client(server, tokens["alice"]) as (alice, seen):
            session_id = (await ran(alice, "create_session", {"language": "python"}))["session_id"]
            await ran(alice, "execute_code", {"code": "secret = 41", "session_id": session_id})
            assert "session" in seen, "the legacy handshake opened no MCP session (no Mcp-Session-Id)"

            async with server.client(tokens["bob"]) as bob:
                answers = {}
                for name, arguments in (
                    ("execute_code", {"code": "print(secret)"}),
                    ("close_session", {}),
                ):
                    theirs = await tool(bob, name, {**arguments, "session_id": session_id})
                    unknown = await tool(bob, name, {**arguments, "session_id": made_up})
                    answers[name] = (theirs, unknown)
                bob_listed = await ran(bob, "list_sessions")
            alice_listed = await ran(alice, "list_sessions")

            # The same MCP request on alice's MCP session, with bob's token, with alice's, and on a
            # session id that was never issued.
            request = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
            headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": seen["version"]}
            posted = {}
            for who, token, mcp_session in (
                ("bob", tokens["bob"], seen["session"]),
                ("alice", tokens["alice"], seen["session"]),
                ("nobody's", tokens["bob"], secrets.token_hex(16)),
            ):
                async with server.http(token) as http:
                    posted[who] = await http.post(
                        "/mcp", json=request, headers={**headers, "Mcp-Session-Id": mcp_session}
                    )

        # A new connection of alice's (the per-request protocol this time) still finds her session:
        # it belongs to her, not to the connection that created it, which has ended.
        async with server.client(tokens["alice"]) as again:
            listed_again = await ran(again, "list_sessions")
            continued = await ran(again, "execute_code", {"code": "print(secret + 1)", "session_id": session_id})
            await ran(again, "close_session", {"session_id": session_id})

    for name, (theirs, unknown) in answers.items():
        assert theirs.is_error, f"bob's {name} on alice's session: {text_of(theirs)}"
        assert "no open session" in text_of(theirs)
        # Nothing tells bob that the id exists: the answer is the made-up id's, word for word.
        assert text_of(theirs).replace(session_id, "ID") == text_of(unknown).replace(made_up, "ID"), name
    assert bob_listed["sessions"] == []
    assert [s["session_id"] for s in alice_listed["sessions"]] == [session_id]
    assert [s["session_id"] for s in listed_again["sessions"]] == [session_id]
    assert continued["stdout"] == "42\n", continued
    assert continued["session"]["call_index"] == 2, "bob's call ran in alice's session"

    assert posted["alice"].status_code == 200, posted["alice"].text
    assert "execute_code" in posted["alice"].text
    assert posted["bob"].status_code == 404, posted["bob"].text
    assert posted["bob"].json() == posted["nobody's"].json()
    assert "execute_code" not in posted["bob"].text

    started = server.events("audit.execution_started")
    assert [r["principal"] for r in started] == ["alice", "alice"], "bob's calls reached a sandbox"
    ended = [r for r in server.events("audit.session_ended") if r["session_id"] == session_id]
    assert [(r["reason"], r["principal"]) for r in ended] == [("closed", "alice")]


async def test_a_principal_at_its_limit_is_refused_at_once_while_others_still_run(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice", "bob")
    env = {
        "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": "4",
        "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS_PER_PRINCIPAL": "1",
    }
    program, gate = gated("0211")
    outcomes: dict[str, CallToolResult] = {}
    with serving(engine, tokens=tokens, env=env) as server:
        async with (
            server.client(tokens["alice"]) as alice,
            server.client(tokens["alice"]) as alice_elsewhere,
            server.client(tokens["bob"]) as bob,
        ):
            async with anyio.create_task_group() as tg:

                async def held() -> None:
                    outcomes["held"] = await tool(alice, "execute_code", {"code": program})

                tg.start_soon(held)
                (started,) = await logged(server, "audit.execution_started")

                # Another connection of the same principal: the limit is the principal's, not the connection's.
                begun = time.monotonic()
                refused = await tool(alice_elsewhere, "execute_code", {"code": "print('second')"})
                refused_after = time.monotonic() - begun

                others = await ran(bob, "execute_code", {"code": "print('bob ran')"})
                during = await scrape(server, tokens["bob"])
                still_held = "held" not in outcomes

                await open_gate(engine, server, gate)
            # Her held call has returned: her place is free again.
            after = await ran(alice_elsewhere, "execute_code", {"code": "print('alice again')"})

    assert started["principal"] == "alice"
    assert refused.is_error, text_of(refused)
    assert "principal" in text_of(refused)
    assert "you already have 1 executions running or queued" in text_of(refused)
    assert refused_after < REFUSED_AT_ONCE, f"the refusal took {refused_after:.1f} s"
    assert others["status"] == "success" and others["stdout"] == "bob ran\n"
    assert still_held, "alice's first call had ended before bob's ran: nothing was shown"
    assert sample(during, "refusals_total", reason="principal_busy") == 1
    assert sample(during, "running_executions") == 1  # alice's held call, and nothing of the refused one

    held_result = outcomes["held"]
    assert not held_result.is_error and held_result.structured_content is not None, text_of(held_result)
    assert held_result.structured_content["status"] == "success"
    assert held_result.structured_content["stdout"] == "done\n"
    assert after["stdout"] == "alice again\n", "alice's slot was not given back"

    busy = [r for r in server.events("audit.execution") if r["status"] == "busy"]
    assert [(r["principal"], "principal" in r["reason"]) for r in busy] == [("alice", True)]
    assert [r["principal"] for r in server.events("audit.execution_started")] == ["alice", "bob", "alice"]


async def test_every_audit_record_names_the_principal(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice", "bob")
    env = {"CODOMYRMEX_SANDBOX_MAX_SESSIONS_PER_CLIENT": "1"}
    with serving(engine, tokens=tokens, env=env) as server:
        async with server.client(tokens["alice"]) as alice, server.client(tokens["bob"]) as bob:
            alices = (await ran(alice, "create_session", {"language": "python"}))["session_id"]
            # The per-client session limit is per principal: alice's session leaves bob his.
            bobs = (await ran(bob, "create_session", {"language": "bash"}))["session_id"]
            second = await tool(alice, "create_session", {"language": "python"})
            await ran(alice, "execute_code", {"code": "x = 1", "session_id": alices})
            await ran(bob, "execute_code", {"code": "echo bob", "language": "bash"})
            await ran(alice, "close_session", {"session_id": alices})
        # Bob's session is his, not his connection's: it outlives the connection, and ends when the server stops.
        async with server.client(tokens["bob"]) as bob_again:
            still = await ran(bob_again, "execute_code", {"code": "echo still here", "session_id": bobs})

    assert still["stdout"] == "still here\n"
    assert second.is_error, text_of(second)
    assert "max_sessions_per_client" in text_of(second)

    started = server.events("audit.execution_started")
    assert [(r["principal"], r["session_id"]) for r in started] == [("alice", alices), ("bob", None), ("bob", bobs)]
    finished = server.events("audit.execution")
    assert [(r["principal"], r["session_id"], r["status"]) for r in finished] == [
        ("alice", alices, "success"),
        ("bob", None, "success"),
        ("bob", bobs, "success"),
    ]
    created = server.events("audit.session_created")
    assert sorted((r["principal"], r["session_id"]) for r in created) == [("alice", alices), ("bob", bobs)]
    ended = server.events("audit.session_ended")
    assert sorted((r["principal"], r["session_id"], r["reason"]) for r in ended) == [
        ("alice", alices, "closed"),
        ("bob", bobs, "shutdown"),
    ]
    refused = server.events("audit.session_refused")
    assert [r["principal"] for r in refused] == ["alice"]
    assert "max_sessions_per_client" in refused[0]["reason"]
    for record in [*started, *finished, *created, *ended, *refused]:
        assert record["principal"] in {"alice", "bob"}, record


# -- metrics, health, readiness -------------------------------------------------------------------


async def test_metrics_count_executions_refusals_and_durations_and_need_the_token(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice")
    with serving(engine, tokens=tokens) as server:
        async with server.client(tokens["alice"]) as alice:
            session_id = (await ran(alice, "create_session", {"language": "python"}))["session_id"]
            success = await ran(alice, "execute_code", {"code": "print(1)"})
            error = await ran(alice, "execute_code", {"code": "echo oops >&2; exit 3", "language": "bash"})
            unknown = await tool(alice, "execute_code", {"code": "x", "language": "cobol"})
            timeout = await ran(alice, "execute_code", {"code": "while True:\n    pass", "timeout_seconds": 1})

            async with server.http() as anonymous:
                refused = await anonymous.get("/metrics")
            scraped = await scrape(server, tokens["alice"])
            await ran(alice, "close_session", {"session_id": session_id})
            closed = await scrape(server, tokens["alice"])

    assert (success["status"], error["status"], timeout["status"]) == ("success", "error", "timeout")
    assert unknown.is_error

    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer ")
    assert "codomyrmex_sandbox" not in refused.text

    executions = {
        dict(labels)["language"] + "/" + dict(labels)["status"]: value
        for (name, labels), value in scraped.items()
        if name == PREFIX + "executions_total"
    }
    assert executions == {"python/success": 1, "bash/error": 1, "python/timeout": 1}
    assert sample(scraped, "execution_duration_seconds_count", language="python") == 2
    assert sample(scraped, "execution_duration_seconds_count", language="bash") == 1
    assert sample(scraped, "execution_duration_seconds_bucket", language="python", le="+Inf") == 2
    python_seconds = sample(scraped, "execution_duration_seconds_sum", language="python")
    assert python_seconds is not None and python_seconds >= 1.0, "the 1 s timeout is not in the durations"
    assert sample(scraped, "refusals_total", reason="unknown_language") == 1
    assert sample(scraped, "refusals_total", reason="unauthorized") == 1  # the scrape without a token
    assert sample(scraped, "queue_depth") == 0
    assert sample(scraped, "running_executions") == 0
    assert sample(scraped, "open_sessions") == 1
    assert sample(closed, "open_sessions") == 0
    warm = {
        (dict(labels)["language"], dict(labels)["pool"])
        for (name, labels), _ in scraped.items()
        if name == PREFIX + "warm_sandboxes"
    }
    assert warm == {(language, pool) for language in LANGUAGES for pool in ("executions", "sessions")}


async def test_public_metrics_need_no_token_while_mcp_still_does(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice")
    with serving(engine, tokens=tokens, env={"CODOMYRMEX_SANDBOX_METRICS_PUBLIC": "true"}) as server:
        scraped = await scrape(server, None)
        async with server.http() as anonymous:
            mcp = await anonymous.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})

    assert sample(scraped, "running_executions") == 0
    assert mcp.status_code == 401


async def test_health_and_readiness_need_no_token_and_readiness_names_missing_images_only(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice")
    with serving(engine, tokens=tokens) as server:
        async with server.http() as anonymous:
            health = await anonymous.get("/healthz")
            ready = await anonymous.get("/readyz")

    prefix = f"cmx-test-no-images-{secrets.token_hex(4)}"
    with serving(engine, tokens=tokens, env={"CODOMYRMEX_SANDBOX_IMAGE_PREFIX": prefix}) as imageless:
        async with imageless.http() as anonymous:
            health_without_images = await anonymous.get("/healthz")
            not_ready = await anonymous.get("/readyz")

    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": __version__}
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True}

    # Such a server starts (it may be waiting for its images) and says so, naming the runtimes only.
    assert health_without_images.status_code == 200
    assert not_ready.status_code == 503
    assert not_ready.json() == {
        "ready": False,
        "reason": "runtime images missing or stale",
        "runtimes": list(LANGUAGES),
    }
    assert prefix not in not_ready.text
    assert "codomyrmex-sandbox" not in not_ready.text


# -- graceful shutdown ----------------------------------------------------------------------------


async def test_sigterm_lets_a_running_call_finish_and_refuses_new_connections_and_calls(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice", "bob")
    program, gate = gated("0631")
    outcomes: dict[str, CallToolResult] = {}
    with serving(engine, tokens=tokens) as server:
        async with (
            server.client(tokens["alice"]) as alice,
            server.client(tokens["bob"]) as bob,
            anyio.create_task_group() as tg,
        ):

            async def running() -> None:
                outcomes["running"] = await tool(alice, "execute_code", {"code": program})

            # As agents do, alice lists the tools first. The SDK's client checks a result against the
            # tool's output schema, and when it has none it asks for the list after the result has
            # come: from a drained server that has stopped by then, so the call would fail on her side.
            await alice.list_tools()
            tg.start_soon(running)
            await logged(server, "audit.execution_started")
            await engine.wait_for_process(server.process.pid, gate)
            # Bob's connection has just been used: it is open (kept alive) when the signal comes.
            await ran(bob, "list_sessions")

            server.signal(signal.SIGTERM)
            await logged(server, "http_draining")
            with pytest.raises(httpx2.ConnectError):
                async with httpx2.AsyncClient(base_url=server.base, timeout=10) as fresh:
                    await fresh.get("/healthz")
            late = await tool(bob, "execute_code", {"code": "print('late')"})
            waiting_for_the_call = server.process.poll() is None

            await open_gate(engine, server, gate)
        status = await exited(server)

    result = outcomes["running"]
    assert not result.is_error and result.structured_content is not None, text_of(result)
    assert result.structured_content["status"] == "success"
    assert result.structured_content["stdout"] == "done\n"
    assert late.is_error, text_of(late)
    assert "shutting down" in text_of(late)
    assert waiting_for_the_call, "the server exited with a call still running"
    assert status == 0

    events = [r["event"] for r in server.events()]
    assert events.index("http_signal") < events.index("http_draining") < events.index("http_stopped")
    assert "http_grace_over" not in events
    finished = server.events("audit.execution")
    assert [(r["principal"], r["status"]) for r in finished] == [("bob", "busy"), ("alice", "success")]
    assert "shutting down" in finished[0]["reason"]


async def test_after_the_grace_a_running_call_is_cancelled_and_its_sandbox_removed(engine, tmp_path: Path):
    tokens = TokenSet.make(tmp_path, "alice")
    program, gate = gated("0742")
    grace = 1.0
    outcome: dict[str, Any] = {}
    ended = anyio.Event()
    with serving(engine, tokens=tokens, env={"CODOMYRMEX_SANDBOX_SHUTDOWN_GRACE_SECONDS": str(grace)}) as server:
        async with server.client(tokens["alice"]) as alice, anyio.create_task_group() as tg:

            async def running() -> None:
                try:
                    outcome["result"] = await alice.call_tool("execute_code", {"code": program})
                except Exception as exc:  # noqa: BLE001 - the server going away under the call is one right answer
                    outcome["error"] = exc
                finally:
                    ended.set()

            tg.start_soon(running)
            container = await engine.wait_for_process(server.process.pid, gate)
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await ended.wait()
            answered_after = time.monotonic() - signalled
        status = await exited(server)
        removed_after = await engine.wait_until_removed(container)

    result = outcome.get("result")
    assert result is None or result.is_error, f"a call cut short by the stop returned a result: {text_of(result)}"
    assert answered_after >= grace * 0.9, f"the call ended {answered_after:.2f} s after the signal, before the grace"
    assert status == 0
    assert removed_after < 5
    events = [r["event"] for r in server.events()]
    assert events.index("http_draining") < events.index("http_grace_over") < events.index("http_stopped")
    (record,) = server.events("audit.execution")
    assert (record["principal"], record["status"]) == ("alice", "cancelled")

"""Input validation (INP-01 to INP-09): hostile arguments are refused clearly, before any sandbox exists.

The arguments come from a model that may be prompt-injected. Each refusal must be a tool result
with ``isError: true`` (or a JSON-RPC error for what is not even a request), must start no
sandbox and pull no image, and must leave the server serving. Values that JSON cannot carry
through the Python client (NaN, infinity, lone surrogates, malformed frames) are written on the
server's stdin by hand. INP-10 (``files[]``) concerns a feature that does not exist yet.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Self

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
LIMITS = {"timeout_seconds": T, "memory_mb": 256}
MIB = 1024 * 1024


class NothingStarted:
    """Checks that a block of calls started no execution and created no container."""

    def __init__(self, server, engine) -> None:
        self.server, self.engine = server, engine

    def __enter__(self) -> Self:
        self.started = len(self.server.audit_events("audit.execution_started"))
        self.containers = self.sandboxes()
        self.images = sorted(tag for image in self.engine.api.images() for tag in image.get("RepoTags") or [])
        return self

    def sandboxes(self) -> set[str]:
        """The server's containers made for an execution (warm-pool members refill on their own)."""
        return {
            c["Id"]
            for c in self.engine.containers(owners={self.server.pid})
            if (c.get("Labels") or {}).get("io.codomyrmex.sandbox.execution-id") != "pool"
        }

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            return
        started = len(self.server.audit_events("audit.execution_started")) - self.started
        assert started == 0, f"{started} executions were started by calls that should have been refused"
        new = self.sandboxes() - self.containers
        assert new == set(), f"containers were created for refused calls: {new}"
        images = sorted(tag for image in self.engine.api.images() for tag in image.get("RepoTags") or [])
        assert images == self.images, "the image list changed: something was pulled or built"


async def refused(server, arguments: dict, *fragments: str) -> str:
    """Call with ``arguments``; the result must be isError and its text must contain every fragment."""
    result = await server.call(arguments)
    text = server.text(result)
    assert result.is_error is True, f"{arguments!r:.200} was not refused: {text[:300]}"
    assert result.structured_content is None
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


async def still_serving(server) -> None:
    result = await server.run("print('still serving')", **LIMITS)
    assert result["stdout"] == "still serving\n"


async def test_fifty_mebibytes_of_code_are_refused_fast_without_starting_a_sandbox(server, engine, measure):
    """INP-01: past the bound on one message, the request is not even read whole (finding 4 of red-team round 1)."""
    code = "#" * (50 * MIB)
    with NothingStarted(server, engine):
        start = time.monotonic()
        with pytest.raises(MCPError) as refusal:
            await server.call({"code": code, **LIMITS})
        elapsed = time.monotonic() - start
    measure("refusal_seconds", round(elapsed, 3))

    assert refusal.value.error.code == INVALID_REQUEST
    assert "over this server's limit" in refusal.value.error.message, refusal.value.error.message
    assert elapsed < 10, f"refusing 50 MiB took {elapsed:.1f} s"
    await still_serving(server)


async def test_five_mebibytes_of_code_are_refused_by_the_cap_without_starting_a_sandbox(server, engine):
    """INP-01: under the message bound, the code cap refuses it, naming the cap."""
    code = "#" * (5 * MIB)
    with NothingStarted(server, engine):
        text = await refused(server, {"code": code, **LIMITS}, "code")
    assert "1048576" in text or "cap" in text, text
    await still_serving(server)


@pytest.mark.parametrize("language", ["python", "bash", "javascript"])
async def test_code_of_210_kb_above_the_argv_limit_runs_correctly(server, language):
    """INP-02"""
    payload = "".join(f"line {i:06d} of a long program\n" for i in range(7000))  # ~210 KB
    assert 200_000 < len(payload) < 1024 * 1024
    expected = f"{len(payload)} {hashlib.sha256(payload.encode()).hexdigest()}"
    code = {
        "python": f"import hashlib\ndata = {payload!r}\nprint(len(data), hashlib.sha256(data.encode()).hexdigest())",
        "bash": f"data='{payload}'\nprintf '%s' \"$data\" > /tmp/d\n"
        'echo "$(wc -c < /tmp/d) $(sha256sum < /tmp/d | cut -c1-64)"',
        "javascript": f"const data = {json.dumps(payload)};\n"
        "console.log(data.length + ' ' + require('crypto').createHash('sha256').update(data).digest('hex'))",
    }[language]
    assert len(code.encode()) > 128 * 1024  # past the kernel's limit for one argv string

    result = await server.run(code, language=language, **LIMITS)

    assert result["status"] == "success", result
    assert result["stdout"].strip() == expected


async def test_shell_metacharacters_in_code_stdin_and_arguments_are_literal_and_run_nothing_on_the_host(
    server, tmp_path
):
    """INP-03"""
    marker = tmp_path / "host-was-touched"
    nasty = f"$(touch {marker}) `touch {marker}`; touch {marker} && touch {marker} | tee {marker} > {marker} \\\" ' * ~"
    python = await server.run(f"import sys\nprint({nasty!r})\nprint(sys.stdin.read())", stdin=nasty, **LIMITS)
    bash = await server.run(f'touch {marker} 2>/dev/null; echo "in the sandbox: $?"', language="bash", **LIMITS)
    for language in (f"python; touch {marker}", f"$(touch {marker})"):
        await refused(server, {"code": "print(1)", "language": language})

    assert python["status"] == "success", python
    assert python["stdout"] == f"{nasty}\n{nasty}\n"
    assert bash["status"] == "success", bash  # it ran in the sandbox, where that path is not the host's
    assert not marker.exists(), "a command in the code ran on the host"
    assert list(tmp_path.iterdir()) == []


async def test_seventeen_malformed_language_names_are_refused_without_pulling_an_image(server, engine):
    """INP-04"""
    # "" is not among them: it means the default language, as null does (strict-mode clients send it).
    names = [
        "node",
        " python",
        "python ",
        "PYTHON",
        "python3",
        "python:latest",
        "../python",
        "python/../bash",
        "docker.io/library/python",
        "python;id",
        "python\n",
        "py\u200bthon",
        "$(id)",
        "bash && id",
        "a" * 1000,
        "python@sha256:" + "0" * 64,
        "codomyrmex-sandbox-python",
    ]
    assert len(names) == 17
    with NothingStarted(server, engine):
        texts = [await refused(server, {"code": "print(1)", "language": name}) for name in names]

    for name, text in zip(names, texts, strict=True):
        assert "python" in text and "bash" in text, f"the refusal of {name!r:.40} does not list the languages: {text}"
        assert len(text) < 2000, "the refusal echoes an unbounded argument"
    await still_serving(server)


@pytest.mark.parametrize(
    "value",
    [-1, 0, -0.0, 1e308, 301, 10**30, "10s", "NaN", True, [], {}],
    ids=[
        "minus-1",
        "zero",
        "minus-zero",
        "1e308",
        "above-cap",
        "huge-int",
        "unit",
        "nan-string",
        "true",
        "list",
        "object",
    ],
)
async def test_hostile_timeouts_are_refused(server, engine, value):
    """INP-05"""
    with NothingStarted(server, engine):
        await refused(server, {"code": "print(1)", "timeout_seconds": value}, "timeout_seconds")


@pytest.mark.parametrize(
    "value",
    [-1, 0, 5, 15, 2049, 10**9, 1e9, 256.5, "256m; --privileged", "0x100", True, None],
    ids=[
        "minus-1",
        "zero",
        "5",
        "15",
        "above-cap",
        "1e9-int",
        "1e9-float",
        "float-256.5",
        "injection",
        "hex-string",
        "true",
        "null-is-the-default",
    ],
)
async def test_hostile_memory_limits_are_refused(server, engine, value):
    """INP-06"""
    if value is None:  # null means "the default": the one value here that runs
        result = await server.run("print(1)", memory_mb=None, timeout_seconds=T)
        assert result["stdout"] == "1\n"
        return
    with NothingStarted(server, engine):
        await refused(server, {"code": "print(1)", "memory_mb": value}, "memory_mb")


async def test_nan_and_infinity_limits_written_by_hand_are_refused(raw_launcher):
    """INP-05 INP-06"""
    lines = {
        5: '"timeout_seconds": NaN',
        6: '"timeout_seconds": Infinity',
        7: '"timeout_seconds": -Infinity',
        8: '"memory_mb": NaN',
        9: '"memory_mb": Infinity',
    }
    async with raw_launcher() as raw:
        answers = {}
        for request_id, argument in lines.items():
            await raw.send_line(
                f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", "params": {{"name": "execute_code", '
                f'"arguments": {{"code": "print(1)", {argument}}}}}}}'.encode()
            )
            answers[request_id] = await raw.response(request_id, within=10)
        after = await raw.call_tool({"code": "print('still serving')", **LIMITS})

    for request_id, answer in answers.items():
        refused_ = "error" in answer or answer["result"].get("isError") is True
        assert refused_, (lines[request_id], answer)
    assert after["result"]["structuredContent"]["stdout"] == "still serving\n"


async def test_extra_arguments_that_would_widen_the_sandbox_are_refused(server, engine):
    """INP-07"""
    extras = {
        "image": "alpine",
        "network": "host",
        "network_mode": "bridge",
        "privileged": True,
        "mounts": [{"source": "/", "target": "/host"}],
        "volumes": ["/:/host"],
        "binds": ["/var/run/docker.sock:/var/run/docker.sock"],
        "env": {"LD_PRELOAD": "/tmp/x.so"},  # noqa: S108 - a path inside the sandbox
        "environment": ["A=1"],
        "cap_add": ["SYS_ADMIN"],
        "security_opt": ["seccomp=unconfined"],
        "user": "0:0",
        "runtime": "runc",
        "devices": ["/dev/mem"],
        "pids_limit": -1,
        "files": [{"path": "/etc/passwd", "content": "x"}],
        "session_id": "other-tenant",
        "__proto__": {"privileged": True},
    }
    with NothingStarted(server, engine):
        for name, value in extras.items():
            await refused(server, {"code": "print(1)", name: value}, name)
        await refused(server, {"code": "print(1)", **extras}, "unknown argument")
    await still_serving(server)


@pytest.mark.parametrize(
    "arguments",
    [
        {"code": 123},
        {"code": ["print(1)"]},
        {"code": {"text": "print(1)"}},
        {"code": None},
        {"code": True},
        {"code": "print(1)", "language": 5},
        {"code": "print(1)", "language": ["python"]},
        {"code": "print(1)", "stdin": 5},
        {"code": "print(1)", "stdin": {"data": "x"}},
        {"code": "print(1)", "stdin": ["a"]},
        {},
        {"language": "python"},
    ],
    ids=lambda a: json.dumps(a)[:40],
)
async def test_arguments_of_the_wrong_type_are_refused_and_the_server_keeps_serving(server, engine, arguments):
    """INP-08"""
    with NothingStarted(server, engine):
        await refused(server, arguments)
    assert engine.process_alive(server.pid)


async def test_malformed_json_rpc_and_deep_nesting_get_an_error_answer_and_the_server_keeps_serving(raw_launcher):
    """INP-08"""
    malformed = {
        "not JSON": b"{not json",
        "no method": b'{"jsonrpc": "2.0", "id": 101}',
        "no params": b'{"jsonrpc": "2.0", "id": 102, "method": "tools/call"}',
        "params as a list": b'{"jsonrpc": "2.0", "id": 103, "method": "tools/call", "params": [1, 2]}',
        "wrong jsonrpc version": b'{"jsonrpc": "1.0", "id": 104, "method": "tools/list"}',
        "empty batch": b"[]",
        "id is an object": b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "tools/list"}',
        "deep nesting": b'{"jsonrpc": "2.0", "id": 105, "method": "tools/call", "params": {"name": "execute_code", '
        b'"arguments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        "binary garbage": b"\x00\x01\x02\xff\xfe",
    }
    unanswered = []
    async with raw_launcher() as raw:
        for number, (name, line) in enumerate(malformed.items()):
            await raw.send_line(line)
            probe_id = 900 + number
            await raw.send({"jsonrpc": "2.0", "id": probe_id, "method": "ping"})
            between = []
            while True:
                message = await raw.receive(within=10)
                if message.get("id") == probe_id:
                    break
                between.append(message)
            if not [m for m in between if "error" in m or (m.get("result") or {}).get("isError")]:
                unanswered.append(name)
        after = await raw.call_tool({"code": "print('still serving')", **LIMITS})

    assert after["result"]["structuredContent"]["stdout"] == "still serving\n"
    assert unanswered == [], (
        f"malformed messages that got no JSON-RPC error (a client would wait forever): {unanswered}"
    )


async def test_nul_bytes_and_lone_surrogates_are_refused_cleanly(server, raw_launcher):
    """INP-09"""
    await refused(server, {"code": "print(1)\x00"}, "NUL")
    await refused(server, {"code": "print('a')\n\x00\nprint('b')"}, "NUL")
    requests = {
        201: '{"code": "print(\'\\ud800\')"}',
        202: '{"code": "print(1)", "stdin": "\\udfff"}',
        203: '{"code": "print(1)\\u0000"}',
        204: '{"code": "print(\'\\ud83d\\ude00\')"}',  # a valid surrogate pair: runs
    }
    answers: dict[int, dict | None] = dict.fromkeys(requests)
    async with raw_launcher() as raw:
        for request_id, arguments in requests.items():
            await raw.send_line(
                f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", "params": '
                f'{{"name": "execute_code", "arguments": {arguments}}}}}'.encode()
            )
        after = await raw.call_tool({"code": "print('still serving')", **LIMITS})
        for message in [json.loads(line) for line in raw.lines]:
            if message.get("id") in answers:
                answers[message["id"]] = message
        with anyio.move_on_after(5):  # a last chance for the answers still missing
            while None in answers.values():
                message = await raw.receive()
                if message.get("id") in answers:
                    answers[message["id"]] = message

    assert after["result"]["structuredContent"]["stdout"] == "still serving\n"
    assert answers[204] is not None and answers[204]["result"]["structuredContent"]["stdout"] == "\U0001f600\n"
    assert answers[203] is not None and answers[203]["result"]["isError"] is True
    for request_id in (201, 202):
        answer = answers[request_id]
        assert answer is not None, f"request {request_id} with a lone surrogate got no answer at all"
        assert "error" in answer or answer["result"]["isError"] is True, answer

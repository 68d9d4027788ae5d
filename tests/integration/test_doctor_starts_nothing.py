"""`codomyrmex-sandbox doctor` only looks: it creates, removes and lists no container.

A health check that starts the warm pool or the reaper changes what it checks (and, on a busy
host, removes another server's leftovers). Here doctor talks to the engine through a proxy that
records the path of every request it sends, with a warm pool configured, so that starting the
pool, sweeping orphans or killing anything would show as a request about containers.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse

import anyio
import anyio.abc
import pytest

from codomyrmex_sandbox import Settings
from tests.support import console_script, server_environment

REQUEST_LINE = re.compile(rb"^(GET|HEAD|POST|PUT|DELETE|PATCH) (\S+) HTTP/1\.[01]$")
DOCTOR_DEADLINE = 120.0


async def _connect(address: str) -> anyio.abc.ByteStream:
    url = urlparse(address)
    if url.scheme in ("unix", "http+unix"):
        return await anyio.connect_unix(url.path)
    if url.scheme == "tcp" and url.hostname and url.port:
        return await anyio.connect_tcp(url.hostname, url.port)
    pytest.skip(f"this test proxies a unix or plain tcp engine address, not {address}")


async def _pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, requests: list[str] | None) -> None:
    """Copy one direction of a connection; on the way to the engine, note each request's method and path."""
    pending = b""
    try:
        async for data in source:
            if requests is not None:
                *lines, pending = (pending + data).split(b"\r\n")
                requests.extend(f"{m[1].decode()} {m[2].decode()}" for line in lines if (m := REQUEST_LINE.match(line)))
            await sink.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await sink.send_eof()


@asynccontextmanager
async def recording_proxy(engine_address: str, requests: list[str]) -> AsyncIterator[str]:
    """A unix socket that forwards to the engine, noting every request; yields its address."""
    with tempfile.TemporaryDirectory(prefix="cdmx-proxy-") as directory:  # short: a socket path is at most 107 bytes
        path = Path(directory) / "engine.sock"
        listener = await anyio.create_unix_listener(path)

        async def forward(client: anyio.abc.ByteStream) -> None:
            async with client, await _connect(engine_address) as upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pump, client, upstream, requests)
                tg.start_soon(_pump, upstream, client, None)

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, forward)
            yield f"unix://{path}"
            tg.cancel_scope.cancel()


async def test_doctor_creates_removes_and_lists_no_container(engine, settings: Settings):
    engine_address = settings.docker_host or server_environment().get("DOCKER_HOST", "unix:///var/run/docker.sock")
    requests: list[str] = []
    async with recording_proxy(engine_address, requests) as proxy:
        environment = server_environment(CODOMYRMEX_SANDBOX_DOCKER_HOST=proxy, CODOMYRMEX_SANDBOX_POOL_SIZE="2")
        with anyio.fail_after(DOCTOR_DEADLINE):
            completed = await anyio.run_process([console_script(), "doctor"], env=environment, check=False)
    output = (completed.stdout + completed.stderr).decode(errors="replace")

    assert "runtimes:" in output, output[-3000:]
    assert any("/info" in request for request in requests), f"doctor did not go through the proxy: {requests}"
    assert any("/images/" in request for request in requests), f"doctor did not ask about the images: {requests}"
    about_containers = [r for r in requests if "/containers" in r or "/networks" in r]
    assert about_containers == [], f"doctor touched containers: {about_containers}"

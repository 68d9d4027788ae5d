"""Real HTTP servers for the tests: ``codomyrmex-sandbox serve --transport http`` as a subprocess.

::

    tokens = TokenSet.make(tmp_path, "alice", "bob")
    with http_server(tokens=tokens) as server:
        async with server.client(tokens["alice"]) as mcp:
            result = await mcp.call_tool("execute_code", {"code": "print(1)"})

The server listens on a free port it picks itself (``--port 0``); `http_server` waits for its
``http_listening`` log line (no polling, no sleeps) and reads the port from it. Every line the
server writes on stderr is kept (`HttpServer.events`), so tests can look at audit records and check
that no token was ever logged. On exit the server gets SIGTERM and must exit 0 within the bound.
"""

from __future__ import annotations

import json
import os
import signal as signals
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from codomyrmex_sandbox.auth import new_token
from tests.support import console_script, server_environment

START_DEADLINE = 60.0
STOP_DEADLINE = 60.0


@dataclass
class TokenSet:
    """A tokens file and the tokens it admits, by principal name."""

    path: Path
    tokens: dict[str, str]

    @classmethod
    def make(cls, directory: Path, *names: str) -> TokenSet:
        tokens, lines = {}, ["# made by the tests"]
        for name in names:
            token, line = new_token(name)
            tokens[name] = token
            lines.append(line)
        path = directory / "tokens.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return cls(path, tokens)

    def __getitem__(self, name: str) -> str:
        return self.tokens[name]


@dataclass
class HttpServer:
    process: subprocess.Popen[bytes]
    port: int
    lines: list[str] = field(default_factory=list)  # stderr, line by line, as the server wrote it
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"{self.base}/mcp"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records written so far (those named ``name``, when given)."""
        with self._lock:
            lines = list(self.lines)
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                records.append(record)
        return records

    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_event(self, name: str, *, within: float = 30.0, count: int = 1) -> list[dict[str, Any]]:
        """Block until at least ``count`` records named ``name`` were written (the server's own pace)."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: sum(1 for _ in self._named(name)) >= count or self.process.poll() is not None, timeout=within
            )
        found = self.events(name)
        if not ok or len(found) < count:
            pytest.fail(
                f"the server did not log {count} x {name!r} within {within} s; stderr:\n{self.stderr()[-4000:]}"
            )
        return found

    def _named(self, name: str) -> Iterator[str]:
        marker = f'"event": "{name}"'
        return (line for line in self.lines if marker in line)

    def _read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def signal(self, signum: int = signals.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signals.SIGTERM, *, within: float = STOP_DEADLINE) -> int:
        """Signal the server and return its exit status (the test fails if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(
                f"the server did not exit within {within} s of signal {signum}; stderr:\n{self.stderr()[-4000:]}"
            )

    def http(self, token: str | None = None, **options: Any) -> httpx2.AsyncClient:
        """An HTTP client for this server, sending ``token`` as the bearer token when given."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers |= options.pop("headers", {})
        return httpx2.AsyncClient(base_url=self.base, headers=headers, timeout=options.pop("timeout", 120), **options)

    @asynccontextmanager
    async def client(self, token: str | None = None, **options: Any) -> AsyncIterator[Client]:
        """The MCP SDK's own client over streamable HTTP, with ``token`` as its bearer token."""
        async with (
            self.http(token) as http,
            Client(streamable_http_client(self.url, http_client=http), **options) as mcp,
        ):
            yield mcp


@contextmanager
def http_server(
    *args: str,
    tokens: TokenSet | None = None,
    env: dict[str, str] | None = None,
    expect_exit: int | None = 0,
) -> Iterator[HttpServer]:
    """Start a server with ``args`` after ``serve --transport http --port 0`` (and ``tokens`` as its
    tokens file); stop it with SIGTERM on exit and check its exit status is ``expect_exit`` (None: any).
    """
    extra = dict(env or {})
    if tokens is not None:
        extra["CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE"] = str(tokens.path)
    command = [console_script(), "serve", "--transport", "http", "--port", "0", *args]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=server_environment(**extra),
        start_new_session=True,  # a signal to the test's process group never reaches it
    )
    server = HttpServer(process, port=0)
    reader = threading.Thread(target=server._read, args=(process.stderr,), daemon=True)
    reader.start()
    try:
        listening = server.wait_for_event("http_listening", within=START_DEADLINE)
        server.port = int(listening[0]["port"])
        yield server
    finally:
        status = server.stop()
        reader.join(timeout=10)
        if expect_exit is not None and status != expect_exit:
            pytest.fail(f"the server exited with {status}, not {expect_exit}; stderr:\n{server.stderr()[-4000:]}")


def start_refused(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``serve --transport http`` with ``args`` expecting it to refuse to start; its exit and output."""
    command = [console_script(), "serve", "--transport", "http", *args]
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=server_environment(**(env or {})),
        timeout=60,
        check=False,
    )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

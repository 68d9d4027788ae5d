"""Cold starts: a server started for one call (as some client libraries start one per call) creates
only what that call needs, and a call in a language that has no warm sandbox yet still runs.

The containers a server created are counted with the engine's own events (a removed container
still has its ``create`` event), filtered by the labels that name the server's process.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import anyio.to_thread
import pytest

from tests.support import MANAGED, OWNER_HOST, OWNER_PID

pytestmark = pytest.mark.docker

# The quiet period after which every language fills is the one rule here that depends on time; it
# is tested without an engine (tests/unit/test_pool.py). Set long here, so that a slow start-up on
# a busy machine cannot fill the other languages before the call and hide what these tests check.
QUIET = {"CODOMYRMEX_SANDBOX_POOL_IDLE_START_SECONDS": "600"}
HELLO = {"python": "print(1)", "javascript": "console.log(1)", "bash": "echo 1"}


def created_by(engine: Any, owner: int, since: float) -> list[dict[str, Any]]:
    """The ``create`` events, from ``since`` until now, of the sandbox containers of server ``owner``."""
    labels = [f"{MANAGED}=true", f"{OWNER_HOST}={socket.gethostname()}", f"{OWNER_PID}={owner}"]
    filters = {"type": "container", "event": "create", "label": labels}
    events = engine.api.events(since=int(since) - 1, until=int(time.time()) + 1, filters=filters, decode=True)
    return list(events)


async def test_a_fresh_server_answering_one_python_call_creates_at_most_two_containers(stdio, engine, monkeypatch):
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    since = time.time()
    async with stdio() as mcp:
        result = await mcp.run("print(1)")
        owner = mcp.owner_pid
    # The client closed stdin and the server exited: it creates nothing more.
    assert result["status"] == "success", result
    assert result["stdout"] == "1\n"
    created = await anyio.to_thread.run_sync(created_by, engine, owner, since)
    ids = [event["id"] for event in created]
    # The python sandbox started at start-up (which ran the call), and at most the first refill
    # begun after the call; never a warm pool for every language (that was six).
    assert 1 <= len(created) <= 2, f"server {owner} created {len(created)} containers: {ids}"
    images = {event["Actor"]["Attributes"].get("image", "") for event in created}
    assert all("python" in image for image in images), f"containers for languages nobody called: {images}"


@pytest.mark.parametrize("language", ["javascript", "bash"])
async def test_a_call_in_another_language_after_start_up_runs(stdio, language, monkeypatch):
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    async with stdio() as mcp:
        first = await mcp.run(HELLO[language], language=language)  # no warm sandbox of it yet: cold
        second = await mcp.run(HELLO[language], language=language)  # cold, or from its pool, now filling
        python = await mcp.run(HELLO["python"])
    for result in (first, second, python):
        assert result["status"] == "success", result
        assert result["stdout"] == "1\n", result
    assert (first["language"], second["language"], python["language"]) == (language, language, "python")

"""Fixtures for the client-library tests: the real engine and images, recorded servers, a scripted model.

Like the integration suite, nothing here skips: an engine that does not answer, a missing runtime image
or a missing ``.venv-clients`` fails with the command that fixes it. After every test, no sandbox
container of a server that the test's client libraries started may remain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.fake_model import FakeModel
from tests.clients.harness import Servers
from tests.support import OwnedSandboxes, describe, engine_fixture

LEFTOVER_DEADLINE = 5.0

# The engine, checked once per session: reachable, and every runtime image built.
engine = engine_fixture(OwnedSandboxes, "client-library")


@pytest.fixture
def servers(engine: OwnedSandboxes, tmp_path: Path) -> Iterator[Servers]:
    """A launcher for client libraries to start in place of the console script (see `Servers`).

    After the test, every sandbox container of every server it started must be gone.
    """
    launched = Servers(tmp_path / "servers")
    yield launched
    launched.wait_until_all_ended()
    owners = launched.pids()
    deadline = time.monotonic() + LEFTOVER_DEADLINE
    left = engine.containers(owners=owners)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = engine.containers(owners=owners)
    if left:
        for container in left:  # so that the next test starts clean
            engine.api.remove_container(container["Id"], force=True)
        pytest.fail(f"sandbox containers were left behind: {describe(left)}")


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModel]:
    """A scripted model on loopback that the OpenAI and Gemini clients of this process talk to.

    Set its ``calls`` before the library runs. Tracing of openai-agents is off for the rest of the
    session (its exporter posts to the internet, never to a base URL): set here, not by the environment
    variable alone, which the SDK reads once and may have read already.
    """
    from agents import set_tracing_disabled  # noqa: PLC0415 - only the tests with a model load the SDK

    set_tracing_disabled(disabled=True)
    model = FakeModel()
    model.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"{model.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-model-on-loopback")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", model.url)
    monkeypatch.setenv("GEMINI_API_KEY", "fake-model-on-loopback")
    for variable in ("GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE"):
        monkeypatch.delenv(variable, raising=False)
    yield model
    model.stop()

"""Fixtures every suite may use. The integration, security and conformance suites build on
tests/support.py as well (the engine, the host, servers started by a test)."""

from __future__ import annotations

import pytest

from codomyrmex_sandbox import Settings


@pytest.fixture
def fake_settings() -> Settings:
    return Settings.load(backend="fake")


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings a real server would load here (defaults, then the operator's environment)."""
    return Settings.load()

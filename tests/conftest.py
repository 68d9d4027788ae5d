"""Shared fixtures. Integration and security tests need Docker and the runtime images."""

from __future__ import annotations

import pytest

from codomyrmex_sandbox import Settings


@pytest.fixture
def fake_settings() -> Settings:
    return Settings.load(backend="fake")

"""codomyrmex-sandbox: run untrusted code in fresh, hardened sandboxes, over MCP or in-process.

The public API::

    from codomyrmex_sandbox import Sandbox, Settings

    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute("print(1)", language="python", timeout_seconds=5)

See README.md for the MCP server and the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

from codomyrmex_sandbox.backends.base import Backend, Job, RuntimeStatus
from codomyrmex_sandbox.backends.fake import FakeBackend, FakeRun
from codomyrmex_sandbox.errors import (
    BackendError,
    ConfigurationError,
    EngineUnavailableError,
    InvalidRequestError,
    LimitAboveCapError,
    RuntimeUnavailableError,
    SandboxError,
    ServerBusyError,
    UnknownLanguageError,
)
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult, Limits, Status
from codomyrmex_sandbox.service import Sandbox, run_code
from codomyrmex_sandbox.settings import Settings

__all__ = [
    "Backend",
    "BackendError",
    "ConfigurationError",
    "EngineUnavailableError",
    "ExecutionRequest",
    "ExecutionResult",
    "FakeBackend",
    "FakeRun",
    "InvalidRequestError",
    "Job",
    "LimitAboveCapError",
    "Limits",
    "RuntimeStatus",
    "RuntimeUnavailableError",
    "Sandbox",
    "SandboxError",
    "ServerBusyError",
    "Settings",
    "Status",
    "UnknownLanguageError",
    "__version__",
    "run_code",
]

"""codomyrmex-sandbox: run untrusted code in fresh, hardened sandboxes, over MCP or in-process.

The public API::

    from codomyrmex_sandbox import Sandbox, Settings

    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute("print(1)", language="python", timeout_seconds=5)

See README.md for the MCP server and the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each public name, and the module that defines it. They load on first use (PEP 562), so that
# `codomyrmex-sandbox --version`, and the parts of the server that start before the rest, do not
# wait for every module of the package.
_EXPORTS = {
    "Backend": "backends.base",
    "Job": "backends.base",
    "RuntimeStatus": "backends.base",
    "FakeBackend": "backends.fake",
    "FakeRun": "backends.fake",
    "BackendError": "errors",
    "ConfigurationError": "errors",
    "EngineUnavailableError": "errors",
    "InvalidRequestError": "errors",
    "LimitAboveCapError": "errors",
    "RuntimeUnavailableError": "errors",
    "SandboxError": "errors",
    "ServerBusyError": "errors",
    "UnknownLanguageError": "errors",
    "ExecutionRequest": "models",
    "ExecutionResult": "models",
    "Limits": "models",
    "Status": "models",
    "Sandbox": "service",
    "run_code": "service",
    "Settings": "settings",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401 - any of the public names
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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

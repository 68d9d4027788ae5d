"""The exceptions this package raises.

Every error a caller can see derives from one base; errors from the layers below (docker-py,
requests, the OS) are translated at the backend boundary, so callers never catch them::

    SandboxError                     the base: something kept an execution from running
    ├── InvalidRequestError          the arguments are wrong (empty language, NUL in code, ...)
    │   ├── LimitAboveCapError       a per-call limit asks for more than the operator allows
    │   └── UnknownLanguageError     no such runtime is enabled on this server
    ├── ConfigurationError           the settings or a runtime recipe are wrong: fix the configuration
    ├── RuntimeUnavailableError      the runtime's image is missing or stale: build it
    ├── EngineUnavailableError       the isolation engine cannot be reached
    ├── ServerBusyError              too many executions at once: retry later
    │   ├── PrincipalBusyError       this principal has its share of the slots already (HTTP)
    │   ├── SessionLimitError        too many sessions open
    │   └── ShuttingDownError        the server drains (SIGTERM) and takes no new calls
    └── BackendError                 the engine failed while preparing or tearing down a sandbox

A program that ran and failed (an exception, a timeout, the memory limit) is not an error:
it is an `ExecutionResult` with the matching status. Errors are for calls that never ran.
Each message says what was wrong and what to do about it.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class: an execution could not be carried out."""


class InvalidRequestError(SandboxError):
    """The request's arguments are invalid; the message names the argument."""


class LimitAboveCapError(InvalidRequestError):
    """A per-call limit exceeds the operator's cap."""

    def __init__(self, argument: str, requested: float, cap: float, unit: str) -> None:
        self.argument = argument
        self.requested = requested
        self.cap = cap
        super().__init__(
            f"{argument}={requested:g} is above this server's cap of {cap:g} {unit}; "
            f"ask for {cap:g} or less (the operator sets the cap)."
        )


_SHOWN = 40  # characters of a rejected language name to echo back


class UnknownLanguageError(InvalidRequestError):
    """The requested language has no enabled runtime."""

    def __init__(self, language: str, available: list[str]) -> None:
        self.language = language
        self.available = available
        shown = language if len(language) <= _SHOWN else language[:_SHOWN] + "..."
        super().__init__(f"unknown language {shown!r}; use one of: {', '.join(sorted(available))}.")


class ConfigurationError(SandboxError):
    """The operator's settings or a runtime recipe are invalid; the message names the setting or file."""


class RuntimeUnavailableError(SandboxError):
    """The runtime exists but its image is not ready on the engine."""


class EngineUnavailableError(SandboxError):
    """The isolation engine (for example the Docker daemon) cannot be reached."""


class ServerBusyError(SandboxError):
    """Every execution slot is taken and the queue is full or the wait ran out."""


class PrincipalBusyError(ServerBusyError):
    """An HTTP principal already holds max_concurrent_executions_per_principal slots and queue places."""


class ShuttingDownError(ServerBusyError):
    """The server is draining before it exits: no new calls, none from the queue."""


class BackendError(SandboxError):
    """The engine failed while creating, running or removing a sandbox."""


class SessionNotFoundError(InvalidRequestError):
    """A session id that is not one of the caller's open sessions (never existed, another client's, or
    ended: then the message says why, to its owner only)."""


class SessionLimitError(ServerBusyError):
    """create_session past max_sessions or max_sessions_per_client."""

"""Resolve a request against the operator's settings: the effective limits, or a denial.

The policy is a ceiling: a request may lower a limit, and raise it only up to the cap.
This is a pure function of its inputs, so it is tested exhaustively without any engine.
"""

from __future__ import annotations

from codomyrmex_sandbox.errors import InvalidRequestError, LimitAboveCapError, UnknownLanguageError
from codomyrmex_sandbox.models import ExecutionRequest, Limits
from codomyrmex_sandbox.settings import Settings


def check_payload(request: ExecutionRequest, settings: Settings) -> tuple[bytes, bytes | None]:
    """Encode code and stdin, enforcing the size rules; returns the bytes that will be sent."""
    code = _encode(request.code, "code")
    if b"\x00" in code:
        raise InvalidRequestError("code contains a NUL byte; remove it (source code never needs one).")
    if not code.strip():
        raise InvalidRequestError("code is empty; send the program to run.")
    if len(code) > settings.max_code_bytes:
        raise InvalidRequestError(
            f"code is {len(code)} bytes, above this server's cap of {settings.max_code_bytes} bytes; "
            "send a shorter program."
        )
    stdin = None if request.stdin is None else _encode(request.stdin, "stdin")
    if stdin is not None and len(stdin) > settings.max_stdin_bytes:
        raise InvalidRequestError(
            f"stdin is {len(stdin)} bytes, above this server's cap of {settings.max_stdin_bytes} bytes."
        )
    return code, stdin


def resolve_limits(request: ExecutionRequest, settings: Settings, languages: list[str]) -> Limits:
    """The effective limits for this request, or an InvalidRequestError naming what to change."""
    if request.language not in languages:
        raise UnknownLanguageError(request.language, languages)
    timeout = settings.default_timeout_seconds if request.timeout_seconds is None else request.timeout_seconds
    if timeout > settings.max_timeout_seconds:
        raise LimitAboveCapError("timeout_seconds", timeout, settings.max_timeout_seconds, "seconds")
    memory = settings.default_memory_mb if request.memory_mb is None else request.memory_mb
    if memory > settings.max_memory_mb:
        raise LimitAboveCapError("memory_mb", memory, settings.max_memory_mb, "MiB")
    return Limits(
        timeout_seconds=timeout,
        memory_mb=memory,
        cpus=settings.cpus,
        pids=settings.pids_limit,
        open_files=settings.open_files_limit,
        file_size_mb=settings.file_size_mb,
        scratch_mb=settings.scratch_mb,
        output_bytes=settings.max_output_bytes,
        network=settings.network,
    )


def _encode(text: str, argument: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{argument} is not valid Unicode (a lone surrogate at position {exc.start}); send UTF-8 text."
        ) from exc

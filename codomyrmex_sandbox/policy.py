"""Resolve a request against the operator's policy: the effective limits, or a denial.

The policy is a ceiling: a request may lower a limit, and raise it only up to the cap. Which
policy applies is the settings' choice: the base settings, the selected profile on top, then the
language's own overrides (see `Settings.policy`). The `Sandbox` resolves each language's policy
once, when it is built (`resolve_policies`); each call is then judged against it
(`resolve_limits`, `check_payload`), and the backend is handed each language's `default_limits`.
These are pure functions of their inputs, so they are tested exhaustively without any engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from codomyrmex_sandbox.errors import InvalidRequestError, LimitAboveCapError, UnknownLanguageError
from codomyrmex_sandbox.models import ExecutionRequest, Limits
from codomyrmex_sandbox.settings import LimitPolicy, Settings


def resolve_policies(settings: Settings, languages: Iterable[str]) -> dict[str, LimitPolicy]:
    """Each language's policy: the settings, then the profile, then the language's overrides."""
    return {language: settings.policy(language) for language in languages}


def check_payload(request: ExecutionRequest, policy: LimitPolicy) -> tuple[bytes, bytes | None]:
    """Encode code and stdin under the size caps of ``policy``, the request's language's; returns the bytes to send."""
    code = _encode(request.code, "code")
    if b"\x00" in code:
        raise InvalidRequestError("code contains a NUL byte; remove it (source code never needs one).")
    if not code.strip():
        raise InvalidRequestError("code is empty; send the program to run.")
    if len(code) > policy.max_code_bytes:
        raise InvalidRequestError(
            f"code is {len(code)} bytes, above this server's cap of {policy.max_code_bytes} bytes; "
            "send a shorter program."
        )
    stdin = None if request.stdin is None else _encode(request.stdin, "stdin")
    if stdin is not None and len(stdin) > policy.max_stdin_bytes:
        raise InvalidRequestError(
            f"stdin is {len(stdin)} bytes, above this server's cap of {policy.max_stdin_bytes} bytes."
        )
    return code, stdin


def resolve_limits(request: ExecutionRequest, policies: Mapping[str, LimitPolicy]) -> Limits:
    """The effective limits for this request, or an InvalidRequestError naming what to change.

    ``policies`` holds the policy of every language this server runs (`resolve_policies`).
    """
    policy = policies.get(request.language)
    if policy is None:
        raise UnknownLanguageError(request.language, sorted(policies))
    return limits_for(request, policy)


def limits_for(request: ExecutionRequest, policy: LimitPolicy) -> Limits:
    """The effective limits of ``request`` under ``policy``, or a LimitAboveCapError naming the cap."""
    timeout = policy.default_timeout_seconds if request.timeout_seconds is None else request.timeout_seconds
    if timeout > policy.max_timeout_seconds:
        raise LimitAboveCapError("timeout_seconds", timeout, policy.max_timeout_seconds, "seconds")
    memory = policy.default_memory_mb if request.memory_mb is None else request.memory_mb
    if memory > policy.max_memory_mb:
        raise LimitAboveCapError("memory_mb", memory, policy.max_memory_mb, "MiB")
    return _limits(policy, timeout, memory)


def session_limits(policy: LimitPolicy, memory_mb: int | None) -> Limits:
    """The limits of a session (its calls' timeout defaults to the policy's), or a LimitAboveCapError."""
    memory = policy.default_memory_mb if memory_mb is None else memory_mb
    if memory > policy.max_memory_mb:
        raise LimitAboveCapError("memory_mb", memory, policy.max_memory_mb, "MiB")
    return _limits(policy, policy.default_timeout_seconds, memory)


def default_limits(policy: LimitPolicy) -> Limits:
    """The effective limits of a call that asks for nothing: what a backend prepares sandboxes for."""
    return _limits(policy, policy.default_timeout_seconds, policy.default_memory_mb)


def _limits(policy: LimitPolicy, timeout: float, memory: int) -> Limits:
    return Limits(
        timeout_seconds=timeout,
        memory_mb=memory,
        cpus=policy.cpus,
        pids=policy.pids_limit,
        open_files=policy.open_files_limit,
        file_size_mb=policy.file_size_mb,
        scratch_mb=policy.scratch_mb,
        output_bytes=policy.max_output_bytes,
        network=policy.network,
        output_files=policy.max_output_files,
        output_file_bytes=policy.max_output_file_bytes,
        output_files_bytes=policy.max_output_files_bytes,
        figures=policy.max_figures,
    )


def _encode(text: str, argument: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{argument} is not valid Unicode (a lone surrogate at position {exc.start}); send UTF-8 text."
        ) from exc

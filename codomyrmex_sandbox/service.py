"""The Sandbox service: the public Python API that the MCP tool and the CLI are thin layers over.

::

    async with Sandbox() as sandbox:
        result = await sandbox.execute("print(1 + 1)")
        assert result.status == "success" and result.stdout == "2\\n"

`execute` returns an `ExecutionResult` for every program that ran, whatever its status, and raises
a `SandboxError` for calls that never ran (invalid arguments, a limit above the cap, an unknown
language, an engine or image that is not there). If the calling task is cancelled, the sandbox is
killed and removed and the cancellation propagates.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import anyio

from codomyrmex_sandbox import audit
from codomyrmex_sandbox.backends import Backend, Job, RuntimeStatus, create_backend
from codomyrmex_sandbox.errors import InvalidRequestError, SandboxError
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult, Limits, request_from_arguments
from codomyrmex_sandbox.output import OutputCallback
from codomyrmex_sandbox.policy import check_payload, resolve_limits
from codomyrmex_sandbox.runtimes import RuntimeSpec, load_runtimes
from codomyrmex_sandbox.settings import Settings


class Sandbox:
    """Runs untrusted code in fresh sandboxes. Use as an async context manager."""

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None) -> None:
        self.settings = settings or Settings.load()
        self.runtimes: dict[str, RuntimeSpec] = load_runtimes(self.settings.runtimes_dir, self.settings.languages)
        self.backend: Backend = backend or create_backend(self.settings, self.runtimes)
        self._opened = False

    @property
    def languages(self) -> list[str]:
        """The languages this server offers, in a stable order."""
        return sorted(self.runtimes)

    async def __aenter__(self) -> Self:
        await self.backend.open()
        self._opened = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Kill and remove every sandbox still running; safe to call twice."""
        if self._opened:
            self._opened = False
            with anyio.CancelScope(shield=True):
                await self.backend.aclose()

    async def runtime_status(self) -> list[RuntimeStatus]:
        return [await self.backend.runtime_status(spec) for spec in self.runtimes.values()]

    async def execute(
        self,
        code: str,
        *,
        language: str = "python",
        stdin: str | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Run ``code`` once in a fresh sandbox and return how it ended."""
        arguments = {
            "code": code,
            "language": language,
            "stdin": stdin,
            "timeout_seconds": timeout_seconds,
            "memory_mb": memory_mb,
        }
        return await self.execute_arguments(arguments, on_output=on_output, client=client)

    async def execute_arguments(
        self,
        arguments: Mapping[str, Any],
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for raw tool arguments (the MCP adapter's path); invalid ones are audited."""
        try:
            request = request_from_arguments(arguments)
        except InvalidRequestError as exc:
            language = arguments.get("language")
            audit.record_ended_without_result(
                uuid.uuid4().hex, str(language)[:40] if language else "python", "denied", client, reason=str(exc)
            )
            raise
        return await self.execute_request(request, on_output=on_output, client=client)

    async def execute_request(
        self,
        request: ExecutionRequest,
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for a request that is already a validated model."""
        if not self._opened:
            raise SandboxError("the Sandbox is not open; use `async with Sandbox(...) as sandbox:`.")
        execution_id = uuid.uuid4().hex
        try:
            limits = resolve_limits(request, self.settings, self.languages)
            code, stdin = check_payload(request, self.settings)
        except InvalidRequestError as exc:
            audit.record_ended_without_result(execution_id, request.language[:40], "denied", client, reason=str(exc))
            raise
        job = Job(execution_id, self.runtimes[request.language], code, stdin, limits, on_output)
        audit.record_started(execution_id, request.language, code, limits, client)
        return await self._run(job, limits, client)

    async def _run(self, job: Job, limits: Limits, client: str | None) -> ExecutionResult:
        try:
            result = await self.backend.execute(job)
        except anyio.get_cancelled_exc_class():
            audit.record_ended_without_result(job.execution_id, job.runtime.name, "cancelled", client)
            raise
        except SandboxError as exc:
            audit.record_ended_without_result(job.execution_id, job.runtime.name, "not_run", client, reason=str(exc))
            raise
        audit.record_finished(result, limits, client)
        return result


def run_code(
    code: str,
    *,
    language: str = "python",
    stdin: str | None = None,
    timeout_seconds: float | None = None,
    memory_mb: int | None = None,
    settings: Settings | None = None,
) -> ExecutionResult:
    """Synchronous convenience for scripts: open a Sandbox, run once, close it."""

    async def once() -> ExecutionResult:
        async with Sandbox(settings) as sandbox:
            return await sandbox.execute(
                code, language=language, stdin=stdin, timeout_seconds=timeout_seconds, memory_mb=memory_mb
            )

    return anyio.run(once)

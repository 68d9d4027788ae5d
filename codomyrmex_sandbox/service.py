"""The Sandbox service: the public Python API that the MCP tool and the CLI are thin layers over.

::

    async with Sandbox() as sandbox:
        result = await sandbox.execute("print(1 + 1)")
        assert result.status == "success" and result.stdout == "2\\n"

`execute` returns an `ExecutionResult` for every program that ran, whatever its status, and raises
a `SandboxError` for calls that never ran (invalid arguments, a limit above the cap, an unknown
language, an engine or image that is not there). If the calling task is cancelled, the sandbox is
killed and removed and the cancellation propagates.

One path from arguments to result, whichever entry point is used (`execute`, `execute_arguments`,
`execute_request`): under one audit trail (`AuditLog.execution`), the arguments are validated into
a request, the request is judged against its language's policy (resolved once, when the Sandbox is
built), the call waits for an admission slot, and the backend runs the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType, TracebackType
from typing import Any, Self

import anyio

from codomyrmex_sandbox.admission import Admission
from codomyrmex_sandbox.audit import AuditLog
from codomyrmex_sandbox.backends import Backend, Job, RuntimeStatus, create_backend
from codomyrmex_sandbox.errors import ConfigurationError, InvalidRequestError, SandboxError
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult, InputFile, Limits, request_from_arguments
from codomyrmex_sandbox.output import OutputCallback
from codomyrmex_sandbox.policy import check_payload, resolve_limits, resolve_policies
from codomyrmex_sandbox.runtimes import RuntimeSpec, load_runtimes
from codomyrmex_sandbox.settings import LimitPolicy, Settings
from codomyrmex_sandbox.workspace import UploadedFile, check_files


class Sandbox:
    """Runs untrusted code in fresh sandboxes.

    Use as an async context manager, entered and exited in the same task (it runs a background
    task group for the backend's upkeep while open). ``policies`` holds each language's policy,
    resolved once here; the backend is handed each language's default limits from them.
    """

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None) -> None:
        self.settings = settings or Settings.load()
        self.runtimes: dict[str, RuntimeSpec] = load_runtimes(self.settings.runtimes_dir, self.settings.languages)
        unknown = sorted(set(self.settings.language_limits) - set(self.runtimes))
        if unknown:
            raise ConfigurationError(
                f"language_limits names {unknown}, which this server does not run; "
                f"use one of: {', '.join(sorted(self.runtimes))}."
            )
        self.policies: Mapping[str, LimitPolicy] = MappingProxyType(resolve_policies(self.settings, self.runtimes))
        self.backend: Backend = backend or create_backend(self.settings, self.runtimes, self.policies)
        self.admission = Admission(
            self.settings.max_concurrent_executions,
            self.settings.max_queued_executions,
            self.settings.max_queue_wait_seconds,
        )
        self.audit = AuditLog(self.settings.audit_log_path)
        self._opened = False
        self._stack: AsyncExitStack | None = None

    @property
    def languages(self) -> list[str]:
        """The languages this server offers, in a stable order."""
        return sorted(self.runtimes)

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self.audit.open()
            stack.callback(self.audit.close)
            await self.backend.open()
            stack.push_async_callback(self._close_backend)
            # Background upkeep (the backend's reaper) lives as long as the Sandbox is open.
            tasks = await stack.enter_async_context(anyio.create_task_group())
            tasks.start_soon(self.backend.maintain)
            stack.callback(tasks.cancel_scope.cancel)
            self._stack = stack.pop_all()
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
        self._opened = False
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not under a new cancel scope: the stack holds a task group whose scope must be current
            # when it exits. The backend's own close is shielded (see _close_backend).
            await stack.aclose()

    async def _close_backend(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.backend.aclose()

    async def runtime_status(self) -> list[RuntimeStatus]:
        return [await self.backend.runtime_status(spec) for spec in self.runtimes.values()]

    def effective_limits(self, request: ExecutionRequest) -> Limits:
        """The limits ``request`` would run with, or the InvalidRequestError that refuses it.

        Raises UnknownLanguageError for a language this server does not run, LimitAboveCapError
        for a limit above its language's cap.
        """
        return resolve_limits(request, self.policies)

    async def execute(
        self,
        code: str,
        *,
        language: str = "python",
        stdin: str | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        files: FilesArgument | None = None,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Run ``code`` once in a fresh sandbox and return how it ended.

        ``files`` go into the working directory before the program starts: a mapping of relative
        path to content (bytes, or str for UTF-8 text), or the tool's entries (`InputFile` or dicts
        of path, content, encoding). The result's ``files`` and ``figures`` carry what came back,
        each with its bytes in ``content``.
        """
        arguments: dict[str, Any] = {
            "code": code,
            "language": language,
            "stdin": stdin,
            "timeout_seconds": timeout_seconds,
            "memory_mb": memory_mb,
        }
        uploads: list[UploadedFile] | None = None
        if isinstance(files, Mapping):  # bytes stay bytes: no base64 round trip for the Python API
            uploads = python_uploads(files)
        else:
            arguments["files"] = None if files is None else [_entry(entry) for entry in files]
        return await self._execute(arguments, on_output, client, uploads)

    async def execute_arguments(
        self,
        arguments: Mapping[str, Any],
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for raw tool arguments (the MCP adapter's path); invalid ones are audited."""
        return await self._execute(arguments, on_output, client)

    async def execute_request(
        self,
        request: ExecutionRequest,
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for a request that is already a validated model."""
        return await self._execute(request, on_output, client)

    async def _execute(
        self,
        call: ExecutionRequest | Mapping[str, Any],
        on_output: OutputCallback | None,
        client: str | None,
        uploads: Sequence[UploadedFile] | None = None,
    ) -> ExecutionResult:
        """The one path from arguments to result; `AuditLog.execution` turns each way it can end into a record."""
        if not self._opened:
            raise SandboxError("the Sandbox is not open; use `async with Sandbox(...) as sandbox:`.")
        with self.audit.execution(_language_named(call), client) as audit:
            request = call if isinstance(call, ExecutionRequest) else request_from_arguments(call)
            audit.requested(request)
            limits = self.effective_limits(request)
            policy = self.policies[request.language]
            code, stdin = check_payload(request, policy)
            files = check_files(request.files if uploads is None else uploads, policy, language=request.language)
            job = Job(audit.execution_id, self.runtimes[request.language], code, stdin, limits, on_output, files)
            async with self.admission.slot():
                audit.started(job)
                result = await self.backend.execute(job)
                audit.finished(result)
            return result


FilesArgument = Mapping[str, bytes | str] | Sequence[InputFile | Mapping[str, Any]]


def python_uploads(files: Mapping[str, bytes | str]) -> list[UploadedFile]:
    """The Python API's mapping of path to content as uploads: bytes as they are, str as UTF-8."""
    uploads = []
    for path, content in files.items():
        if not isinstance(path, str):
            raise InvalidRequestError(f"files: a path must be a str, not {type(path).__name__} ({path!r:.80}).")
        if isinstance(content, str):
            try:
                data = content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(
                    f"files[{path!r:.80}]: the text is not valid Unicode ({exc.reason})."
                ) from exc
        elif isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
        else:
            raise InvalidRequestError(
                f"files[{path!r:.80}]: content must be bytes or str, not {type(content).__name__}."
            )
        uploads.append(UploadedFile(path, data))
    return uploads


def _entry(entry: InputFile | Mapping[str, Any]) -> Any:  # noqa: ANN401 - validated as a tool argument
    return entry.model_dump() if isinstance(entry, InputFile) else entry


def _language_named(call: ExecutionRequest | Mapping[str, Any]) -> str:
    """The language a call names, for its audit records, before its arguments are validated."""
    if isinstance(call, ExecutionRequest):
        return call.language
    language = call.get("language")
    return str(language) if language else "python"


def run_code(
    code: str,
    *,
    language: str = "python",
    stdin: str | None = None,
    timeout_seconds: float | None = None,
    memory_mb: int | None = None,
    files: FilesArgument | None = None,
    settings: Settings | None = None,
) -> ExecutionResult:
    """Synchronous convenience for scripts: open a Sandbox, run once, close it."""

    async def once() -> ExecutionResult:
        async with Sandbox(settings) as sandbox:
            return await sandbox.execute(
                code,
                language=language,
                stdin=stdin,
                timeout_seconds=timeout_seconds,
                memory_mb=memory_mb,
                files=files,
            )

    return anyio.run(once)

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

import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType, TracebackType
from typing import Any, Self

import anyio

from codomyrmex_sandbox.admission import Admission
from codomyrmex_sandbox.audit import AuditLog, ExecutionAudit, files_summary
from codomyrmex_sandbox.backends import Backend, Job, RuntimeStatus, create_backend
from codomyrmex_sandbox.backends.base import SessionJob
from codomyrmex_sandbox.errors import (
    ConfigurationError,
    EngineUnavailableError,
    InvalidRequestError,
    LimitAboveCapError,
    SandboxError,
    ServerBusyError,
    UnknownLanguageError,
)
from codomyrmex_sandbox.metrics import Metrics, Snapshot, reason_of
from codomyrmex_sandbox.models import (
    ClosedSession,
    CloseSessionRequest,
    CreatedSession,
    CreateSessionRequest,
    ExecutionRequest,
    ExecutionResult,
    InputFile,
    Limits,
    ResourceUsage,
    SessionList,
    SessionState,
    WrittenFile,
    request_from_arguments,
    validate_arguments,
)
from codomyrmex_sandbox.output import OutputCallback
from codomyrmex_sandbox.policy import check_payload, limits_for, resolve_limits, resolve_policies, session_limits
from codomyrmex_sandbox.principals import Principal
from codomyrmex_sandbox.runtimes import RuntimeSpec, load_runtimes
from codomyrmex_sandbox.sessions import Session, SessionRegistry, new_session_id
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
            per_principal=self.settings.principal_concurrency(),
        )
        self.metrics = Metrics()
        self.audit = AuditLog(self.settings.audit_log_path, self.metrics)
        self.sessions = SessionRegistry(self.settings.max_sessions, self.settings.max_sessions_per_client)
        self.metrics.watch(self._gauges)
        # The owner of sessions created through the Python API of this Sandbox (the MCP adapter
        # passes each connection's own).
        self.local_owner = "local:" + secrets.token_hex(16)
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
            tasks.start_soon(self._end_sessions_on_time)
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
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for session in self.sessions.sessions():
                    tg.start_soon(self._end_session, session, "shutdown")
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

    async def readiness(self) -> dict[str, Any]:
        """Whether this server can run calls now: ``ready``, and what is wrong if not, in terms that
        reveal no setting (the engine answers or not; each runtime's image is there or not)."""
        if self.draining:
            return {"ready": False, "reason": "shutting down"}
        try:
            await self.backend.ping()
        except EngineUnavailableError:
            return {"ready": False, "reason": "the isolation engine does not answer"}
        statuses = await self.runtime_status()
        missing = sorted(status.name for status in statuses if not status.ready)
        if missing:
            return {"ready": False, "reason": "runtime images missing or stale", "runtimes": missing}
        return {"ready": True}

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def drain(self) -> None:
        """Stop taking calls (new ones and queued ones are refused as busy); running calls go on.
        Then `admission.wait_idle()` returns once they have ended."""
        self.admission.drain()

    def _gauges(self) -> Snapshot:
        return Snapshot(
            queue_depth=self.admission.waiting,
            running=self.admission.running,
            open_sessions=len(self.sessions),
            warm=self.backend.warm_sandboxes(),
        )

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
        language: str | None = None,
        stdin: str | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        files: FilesArgument | None = None,
        session_id: str | None = None,
        on_output: OutputCallback | None = None,
        client: str | None = None,
        owner: str | None = None,
        principal: Principal | None = None,
    ) -> ExecutionResult:
        """Run ``code`` once in a fresh sandbox (or in session ``session_id``) and return how it ended.

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
            "session_id": session_id,
        }
        uploads = _files_argument(arguments, files)
        return await self._execute(arguments, on_output, client, owner, principal=principal, uploads=uploads)

    async def execute_arguments(
        self,
        arguments: Mapping[str, Any],
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
        owner: str | None = None,
        principal: Principal | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for raw tool arguments (the MCP adapter's path); invalid ones are audited.

        ``owner`` is who may use the sessions it names (the MCP adapter: the connection); default
        the ``principal``'s key, else this Sandbox's own Python API caller (`local_owner`). A
        ``principal`` (HTTP) is named in the audit records and holds at most its share of the slots.
        """
        return await self._execute(arguments, on_output, client, owner, principal=principal)

    async def execute_request(
        self,
        request: ExecutionRequest,
        *,
        on_output: OutputCallback | None = None,
        client: str | None = None,
        owner: str | None = None,
        principal: Principal | None = None,
    ) -> ExecutionResult:
        """Like `execute`, for a request that is already a validated model."""
        return await self._execute(request, on_output, client, owner, principal=principal)

    async def _execute(
        self,
        call: ExecutionRequest | Mapping[str, Any],
        on_output: OutputCallback | None,
        client: str | None,
        owner: str | None,
        *,
        principal: Principal | None,
        uploads: Sequence[UploadedFile] | None = None,
    ) -> ExecutionResult:
        """The one path from arguments to result; `AuditLog.execution` turns each way it can end into a record."""
        self._check_open()
        named = principal.name if principal is not None else None
        with self.audit.execution(
            _language_named(call), client, principal=named, session_id=_session_named(call)
        ) as audit:
            request = call if isinstance(call, ExecutionRequest) else request_from_arguments(call)
            audit.requested(request)
            if request.session_id is not None:
                return await self._execute_in_session(
                    request, audit, on_output, _owner(owner, principal, self.local_owner), principal
                )
            limits = self.effective_limits(request)
            policy = self.policies[request.language]
            code, stdin = check_payload(request, policy)
            files = check_files(request.files if uploads is None else uploads, policy, language=request.language)
            job = Job(audit.execution_id, self.runtimes[request.language], code, stdin, limits, on_output, files)
            async with self.admission.slot(_key(principal)):
                audit.started(job)
                result = await self.backend.execute(job)
                audit.finished(result)
            return result

    def _check_open(self) -> None:
        if not self._opened:
            raise SandboxError("the Sandbox is not open; use `async with Sandbox(...) as sandbox:`.")

    # -- sessions ----------------------------------------------------------------------------

    async def _execute_in_session(
        self,
        request: ExecutionRequest,
        audit: ExecutionAudit,
        on_output: OutputCallback | None,
        owner: str,
        principal: Principal | None,
    ) -> ExecutionResult:
        """One call in a session: its limits are the session's (the timeout the call's own, within the
        cap and the session's hard end); calls of a session run one at a time, in arrival order."""
        assert request.session_id is not None  # noqa: S101 - the caller checked
        session = self.sessions.get(request.session_id, owner)
        if "language" in request.model_fields_set and request.language != session.language:
            raise InvalidRequestError(
                f"session {session.session_id} runs {session.language}, not {request.language}; leave language "
                f"out (or send {session.language!r}), or call without session_id for another language."
            )
        if request.memory_mb is not None and request.memory_mb != session.limits.memory_mb:
            raise InvalidRequestError(
                "memory_mb cannot be changed on a call in a session: the session's memory limit "
                f"({session.limits.memory_mb} MiB) holds for all its calls; leave memory_mb out (or send "
                f"{session.limits.memory_mb}), or create a session with the memory you need."
            )
        if request.files:
            raise InvalidRequestError(
                "files cannot be given to a call in a session: pass them to create_session, or write them from "
                "the session's code (the working directory keeps them from call to call)."
            )
        request = request.model_copy(update={"language": session.language})
        audit.requested(request)
        policy = self.policies[session.language]
        timeout = limits_for(request, policy).timeout_seconds
        code, stdin = check_payload(request, policy)
        await self._wait_for_session(session)
        try:
            session = self.sessions.get(session.session_id, owner)  # it may have ended while this call waited
            remaining = session.remaining()
            if remaining <= 0:
                await self._end_session(session, "lifetime")
                self.sessions.get(session.session_id, owner)  # raises: it has ended, and says why
            limits = session.limits.model_copy(update={"timeout_seconds": min(timeout, remaining)})
            job = Job(audit.execution_id, self.runtimes[session.language], code, stdin, limits, on_output)
            async with self.admission.slot(_key(principal)):
                audit.started(job)
                session.running = True
                session.calls += 1
                self.sessions.touched()
                try:
                    outcome = await session.backend.execute(job)
                except BaseException as exc:  # the interpreter's state is unknown: the session is over
                    why = "failed" if isinstance(exc, Exception) else "cancelled"  # an engine error, or the caller
                    with anyio.CancelScope(shield=True):
                        await self._end_session(session, why)
                    raise
                finally:
                    session.running = False
                    session.last_used = time.monotonic()
            session.add_usage(outcome.result.usage)
            state = SessionState(
                session_id=session.session_id,
                call_index=session.calls,
                state="kept" if outcome.ended is None else "ended",
                ended_reason=outcome.ended,
            )
            result = outcome.result.model_copy(update={"session": state})
            audit.finished(result)
            if outcome.ended is not None:
                await self._end_session(session, outcome.ended)
            return result
        finally:
            session.lock.release()
            self.sessions.touched()

    async def _wait_for_session(self, session: Session) -> None:
        """Take the session's turn (FIFO); a call waits as long as the running one may still take, and
        the queue's own wait, then it is refused as busy."""
        running = self.policies[session.language].max_timeout_seconds + self.settings.files_collect_seconds + 5
        with anyio.move_on_after(running + self.settings.max_queue_wait_seconds):
            await session.lock.acquire()
            return
        raise ServerBusyError(
            f"session {session.session_id} is still busy with another call; calls of a session run one at a "
            "time. Retry once it has returned."
        )

    async def _end_session(self, session: Session, why: str) -> ResourceUsage | None:
        """Remove a session's sandbox and write its end record, once, whoever ends it; the whole
        session's usage (None when it had ended already, or is not known)."""
        if not self.sessions.remove(session, why):
            return None
        with anyio.CancelScope(shield=True):
            try:
                usage = await session.backend.close()
            except SandboxError:
                usage = None
        self.audit.write(
            "audit.session_ended",
            session_id=session.session_id,
            client=session.client,
            principal=session.principal,
            language=session.language,
            reason=why,
            calls=session.calls,
            seconds=round(time.monotonic() - session.created, 3),
            usage=None if usage is None else usage.model_dump(),
            calls_cpu_time_ms=round(session.cpu_time_ms, 3),
        )
        return usage

    async def close_sessions_of(self, owner: str, why: str) -> None:
        """End every session of ``owner`` now (its connection went away), running calls included."""
        async with anyio.create_task_group() as tg:
            for session in self.sessions.owned_by(owner):
                tg.start_soon(self._end_session, session, why)

    async def _end_sessions_on_time(self) -> None:
        """Runs while the Sandbox is open: ends each session once it was idle too long or reached its
        hard end. A session with a call running is left to that call (its timeout is clamped to the
        hard end); it is looked at again when the call ends."""
        while True:
            for session, why in self.sessions.due(time.monotonic()):
                if not session.lock.locked():
                    await self._end_session(session, why)
            await self.sessions.wait_for_change(self.sessions.next_due())

    async def create_session(
        self,
        language: str = "python",
        *,
        memory_mb: int | None = None,
        files: FilesArgument | None = None,
        idle_timeout_seconds: float | None = None,
        client: str | None = None,
        owner: str | None = None,
        principal: Principal | None = None,
    ) -> CreatedSession:
        """Open a session: one sandbox whose interpreter keeps its state from call to call. Pass its
        ``session_id`` to `execute`; see `session` for the context-manager form."""
        arguments: dict[str, Any] = {
            "language": language,
            "memory_mb": memory_mb,
            "idle_timeout_seconds": idle_timeout_seconds,
        }
        uploads = _files_argument(arguments, files)
        return await self.create_session_arguments(
            arguments, client=client, owner=owner, principal=principal, uploads=uploads
        )

    async def create_session_arguments(
        self,
        arguments: Mapping[str, Any],
        *,
        client: str | None = None,
        owner: str | None = None,
        principal: Principal | None = None,
        uploads: Sequence[UploadedFile] | None = None,
    ) -> CreatedSession:
        """`create_session` for raw tool arguments (the MCP adapter's path)."""
        self._check_open()
        owner = _owner(owner, principal, self.local_owner)
        named = principal.name if principal is not None else None
        try:
            request = validate_arguments(CreateSessionRequest, arguments)
            policy = self.policies.get(request.language)
            if policy is None:
                raise UnknownLanguageError(request.language, self.languages)
            limits = session_limits(policy, request.memory_mb)
            idle = self._idle_timeout(request.idle_timeout_seconds)
            files = check_files(request.files if uploads is None else uploads, policy, language=request.language)
            self.sessions.reserve(owner)
        except SandboxError as exc:
            self.audit.write("audit.session_refused", client=client, principal=named, reason=str(exc))
            self.metrics.refused(reason_of(exc))
            raise
        session_id = new_session_id()
        lifetime = self.settings.session_max_lifetime_seconds
        try:
            job = SessionJob(session_id, self.runtimes[request.language], limits, lifetime, files)
            async with self.admission.slot(_key(principal)):
                backend_session = await self.backend.open_session(job)
            session = Session(
                session_id=session_id,
                owner=owner,
                client=client,
                principal=named,
                language=request.language,
                limits=limits,
                idle_timeout=idle,
                backend=backend_session,
                lifetime=lifetime,
            )
            self.sessions.add(session)
        except BaseException as exc:
            self.audit.write(
                "audit.session_refused", client=client, principal=named, language=request.language, reason=str(exc)
            )
            if isinstance(exc, SandboxError):
                self.metrics.refused(reason_of(exc))
            raise
        finally:
            self.sessions.release(owner)
        self.audit.write(
            "audit.session_created",
            session_id=session_id,
            client=client,
            principal=named,
            language=request.language,
            runtime=backend_session.runtime_version,
            limits=limits.model_dump(),
            idle_timeout_seconds=idle,
            lifetime_seconds=lifetime,
            files_in=files_summary((upload.sha256, len(upload.data)) for upload in files),
        )
        return CreatedSession(
            session_id=session_id,
            language=request.language,
            runtime=backend_session.runtime_version,
            limits=limits,
            idle_timeout_seconds=idle,
            expires_at=session.expires_at,
            files=[WrittenFile(path=u.path, size_bytes=len(u.data), sha256=u.sha256) for u in files],
        )

    def _idle_timeout(self, requested: float | None) -> float:
        cap = self.settings.session_idle_timeout_seconds
        if requested is None:
            return cap
        if requested > cap:
            raise LimitAboveCapError("idle_timeout_seconds", requested, cap, "seconds")
        return requested

    async def close_session(
        self, session_id: str, *, owner: str | None = None, principal: Principal | None = None
    ) -> ClosedSession:
        """End one of the caller's sessions (after its running call, if any) and remove its sandbox."""
        return await self.close_session_arguments({"session_id": session_id}, owner=owner, principal=principal)

    async def close_session_arguments(
        self,
        arguments: Mapping[str, Any],
        *,
        owner: str | None = None,
        client: str | None = None,
        principal: Principal | None = None,
    ) -> ClosedSession:
        """`close_session` for raw tool arguments (the MCP adapter's path)."""
        self._check_open()
        del client  # the end record names the client (and principal) that created the session
        request = validate_arguments(CloseSessionRequest, arguments)
        session = self.sessions.get(request.session_id, _owner(owner, principal, self.local_owner))
        await self._wait_for_session(session)
        try:
            usage = await self._end_session(session, "closed")
        finally:
            session.lock.release()
        return ClosedSession(session_id=session.session_id, calls=session.calls, usage=usage)

    def list_sessions(self, *, owner: str | None = None, principal: Principal | None = None) -> SessionList:
        """The caller's open sessions, oldest first."""
        owned = self.sessions.owned_by(_owner(owner, principal, self.local_owner))
        return SessionList(sessions=[session.summary() for session in owned])

    def session(
        self,
        language: str = "python",
        *,
        memory_mb: int | None = None,
        files: FilesArgument | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> SandboxSession:
        """A session as an async context manager: created on entry, closed on exit::

        async with sandbox.session(language="python") as session:
            await session.execute("import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})")
            result = await session.execute("df.a.sum()")  # result.return_value == "3"
        """
        return SandboxSession(self, language, memory_mb=memory_mb, files=files, idle_timeout=idle_timeout_seconds)


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


def _files_argument(arguments: dict[str, Any], files: FilesArgument | None) -> list[UploadedFile] | None:
    """The Python API's ``files``: a mapping becomes uploads as they are (bytes stay bytes, no base64
    round trip); the tool's entries go into ``arguments``, to be validated as the tool's are."""
    if isinstance(files, Mapping):
        return python_uploads(files)
    arguments["files"] = None if files is None else [_entry(entry) for entry in files]
    return None


def _entry(entry: InputFile | Mapping[str, Any]) -> Any:  # noqa: ANN401 - validated as a tool argument
    return entry.model_dump() if isinstance(entry, InputFile) else entry


class SandboxSession:
    """A session of the Python API (`Sandbox.session`): created on entry, closed on exit."""

    def __init__(
        self,
        sandbox: Sandbox,
        language: str,
        *,
        memory_mb: int | None,
        files: FilesArgument | None,
        idle_timeout: float | None,
    ) -> None:
        self._sandbox = sandbox
        self._arguments = (language, memory_mb, files, idle_timeout)
        self.info: CreatedSession | None = None

    @property
    def session_id(self) -> str:
        if self.info is None:
            raise SandboxError("the session is not open; use `async with sandbox.session(...) as session:`.")
        return self.info.session_id

    async def __aenter__(self) -> Self:
        language, memory_mb, files, idle = self._arguments
        self.info = await self._sandbox.create_session(
            language, memory_mb=memory_mb, files=files, idle_timeout_seconds=idle
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def execute(
        self,
        code: str,
        *,
        stdin: str | None = None,
        timeout_seconds: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecutionResult:
        """Run ``code`` in the session's interpreter; ``result.session.state`` says whether it lives on."""
        return await self._sandbox.execute(
            code, stdin=stdin, timeout_seconds=timeout_seconds, session_id=self.session_id, on_output=on_output
        )

    async def close(self) -> ClosedSession | None:
        """End the session (nothing to do once it has ended); its totals, when it was still open."""
        if self.info is None or not self._sandbox.sessions.is_open(self.info.session_id):
            return None
        with anyio.CancelScope(shield=True):
            closed = await self._sandbox.close_session(self.info.session_id)
        return closed  # noqa: RET504 - returned outside the shield, which mypy reads as a missing return


def _owner(owner: str | None, principal: Principal | None, local: str) -> str:
    """Who a call's sessions belong to: as given, else the principal, else the Python API's caller."""
    if owner is not None:
        return owner
    return principal.key if principal is not None else local


def _key(principal: Principal | None) -> str | None:
    return None if principal is None else principal.key


def _language_named(call: ExecutionRequest | Mapping[str, Any]) -> str:
    """The language a call names, for its audit records, before its arguments are validated."""
    if isinstance(call, ExecutionRequest):
        return call.language
    language = call.get("language")
    return str(language) if language else "python"


def _session_named(call: ExecutionRequest | Mapping[str, Any]) -> str | None:
    """The session a call names, for its audit records, before its arguments are validated."""
    value = call.session_id if isinstance(call, ExecutionRequest) else call.get("session_id")
    return value[:80] if isinstance(value, str) else None


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

"""The audit trail: a start record and an end record for every execution and every denial.

Every call goes through one path: `AuditLog.execution` opens an `ExecutionAudit` around the whole
call, which writes the start record when the call is admitted (``started``) and exactly one end
record, however the call ends. Each way to end is an `Outcome`, and the end record's ``status``
says which:

    the call ...                                            outcome     status
    returned a result (the program ran, whatever its end)   FINISHED    the result's status
    was refused: invalid arguments, a limit above the cap,  DENIED      "denied"
      an unknown language, the payload rules
    found no execution slot (queue full, wait over)         BUSY        "busy"
    was cancelled while queued (no start record), or        CANCELLED   "cancelled"
      while running (the sandbox was killed)
    failed in the engine or the runtime, or ended without   NOT_RUN     "not_run"
      a result for any other reason

Each record is a structlog event on stderr (``audit.execution_started``, ``audit.execution``) and,
when ``audit_log_path`` is set, one JSON line appended to that file. The start record is written
before any sandbox exists, so a crash between start and end still leaves a trace. Records carry a
SHA-256 of the code and its size, never the code itself, and never environment values. The schema
is documented in SECURITY.md.

The file stays valid JSON Lines whatever happens to the server: each record is written with one
``write`` call on a descriptor opened with ``O_APPEND`` (so a record is never interleaved with
another, and a SIGKILL can at worst leave the last record cut short), and opening the file drops
such a cut-short last record, saying so on stderr, before anything is appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from codomyrmex_sandbox.backends.base import Job
from codomyrmex_sandbox.errors import InvalidRequestError, ServerBusyError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.metrics import Metrics, reason_of
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult

AUDIT_LOGGER = "codomyrmex_sandbox.audit"
SCHEMA_VERSION = 1


def code_digest(code: bytes) -> str:
    return hashlib.sha256(code).hexdigest()


def files_summary(files: Iterable[tuple[str, int]]) -> dict[str, Any]:
    """Files in or out as an audit record holds them: how many, their total size, their hashes;
    never their names or their content."""
    listed = list(files)
    return {"count": len(listed), "bytes": sum(size for _, size in listed), "sha256": [sha for sha, _ in listed]}


def requested_limits(request: ExecutionRequest | None) -> dict[str, Any]:
    if request is None:
        return {}
    return {"timeout_seconds": request.timeout_seconds, "memory_mb": request.memory_mb}


class Outcome(StrEnum):
    """How one call ended; the end record's ``status`` is the value (FINISHED: the result's status)."""

    FINISHED = "finished"
    DENIED = "denied"
    BUSY = "busy"
    CANCELLED = "cancelled"
    NOT_RUN = "not_run"


def outcome_of(error: BaseException | None) -> Outcome:
    """The outcome of a call that ended without a result, by what ended it."""
    if isinstance(error, InvalidRequestError):
        return Outcome.DENIED
    if isinstance(error, ServerBusyError):
        return Outcome.BUSY
    if error is not None and not isinstance(error, Exception):
        # The caller's cancellation (asyncio's and trio's are BaseExceptions), or the process being
        # interrupted (KeyboardInterrupt, SystemExit): the call was stopped from outside.
        return Outcome.CANCELLED
    return Outcome.NOT_RUN


class AuditLog:
    """Writes audit records to stderr (always) and to an append-only JSON Lines file (if configured)."""

    def __init__(self, path: Path | None = None, metrics: Metrics | None = None) -> None:
        self.path = path
        self.metrics = metrics  # fed by each execution's end record
        self._fd: int | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self.path is not None and self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _drop_torn_record(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def execution(
        self, language: str, client: str | None, *, principal: str | None = None, session_id: str | None = None
    ) -> ExecutionAudit:
        """The audit trail of one new call, under a fresh execution id; use it as a context manager.
        ``principal`` is who made the call over HTTP (None over stdio and the Python API)."""
        return ExecutionAudit(self, uuid.uuid4().hex, language[:40], client, session_id, principal)

    def write(self, event: str, **fields: Any) -> None:  # noqa: ANN401
        """Write one record. The service writes only through `execution`, which keeps the schema's records."""
        get_logger(AUDIT_LOGGER).info(event, **fields)
        if self._fd is None:
            return
        record = {
            "schema": SCHEMA_VERSION,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "event": event,
            **fields,
        }
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is not None:
                written = os.write(self._fd, line)
                while written < len(line):  # a short write (a full disk, a signal): finish the record
                    written += os.write(self._fd, line[written:])


class ExecutionAudit:
    """One call's audit trail: a start record once admitted, and exactly one end record, whatever happens.

    Enter it before anything about the call is checked; ``requested`` names the validated request,
    ``started`` writes the start record, ``finished`` the end record of a result. Leaving the block
    without a result writes the end record of the `Outcome` that the exception (or its absence) maps to.
    """

    def __init__(  # noqa: PLR0917 - the record's fields
        self,
        log: AuditLog,
        execution_id: str,
        language: str,
        client: str | None,
        session_id: str | None = None,
        principal: str | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.principal = principal
        self.session_id = session_id  # the session the call names, if any (the records carry it)
        self.language = language  # a request's, at most 40 characters, or "python" when it names none
        self.outcome: Outcome | None = None
        self._log = log
        self._client = client
        self._request: ExecutionRequest | None = None
        self._job: Job | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.outcome is None:
            self._ended(outcome_of(exc), exc)

    def requested(self, request: ExecutionRequest) -> None:
        """The call's arguments are a valid request; what the records say it asked for."""
        self._request = request
        self.language = request.language[:40]

    def started(self, job: Job) -> None:
        """The call was admitted and is about to reach the backend: the start record."""
        self._job = job
        self._log.write(
            "audit.execution_started",
            execution_id=job.execution_id,
            client=self._client,
            principal=self.principal,
            session_id=self.session_id,
            language=self._request.language if self._request is not None else self.language,
            code_sha256=code_digest(job.code),
            code_bytes=len(job.code),
            stdin_bytes=None if job.stdin is None else len(job.stdin),
            files_in=files_summary((upload.sha256, len(upload.data)) for upload in job.files),
            requested=requested_limits(self._request),
            limits=job.limits.model_dump(),
        )

    def finished(self, result: ExecutionResult) -> None:
        """The program ran and ended: the end record carries its result."""
        if self._job is None:
            msg = "finished() before started(): a result needs a started execution"
            raise RuntimeError(msg)
        self.outcome = Outcome.FINISHED
        self._log.write(
            "audit.execution",
            execution_id=result.execution_id,
            client=self._client,
            principal=self.principal,
            session_id=self.session_id,
            call_index=None if result.session is None else result.session.call_index,
            session_state=None if result.session is None else result.session.state,
            language=result.language,
            runtime=result.runtime,
            requested=requested_limits(self._request),
            limits=self._job.limits.model_dump(),
            status=result.status.value,
            exit_code=result.exit_code,
            signal=result.signal,
            duration_ms=result.duration_ms,
            usage=None if result.usage is None else result.usage.model_dump(),
            stdout_bytes=len(result.stdout.encode("utf-8", "replace")),
            stderr_bytes=len(result.stderr.encode("utf-8", "replace")),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            files_out=files_summary((entry.sha256, entry.size_bytes) for entry in result.files),
            figures_out=files_summary((entry.sha256, entry.size_bytes) for entry in result.figures),
            files_complete=result.files_complete,
        )
        if self._log.metrics is not None:
            self._log.metrics.executed(result.language, result.status.value, result.duration_ms / 1000)

    def _ended(self, outcome: Outcome, error: BaseException | None) -> None:
        self.outcome = outcome
        if outcome is Outcome.CANCELLED:
            reason = None
        elif error is None:
            reason = "the call ended without a result"
        else:
            reason = str(error)
        self._log.write(
            "audit.execution",
            execution_id=self.execution_id,
            client=self._client,
            principal=self.principal,
            session_id=self.session_id,
            language=self.language,
            requested=requested_limits(self._request),
            status=outcome.value,
            reason=reason,
        )
        metrics = self._log.metrics
        if metrics is None:
            return
        if outcome in {Outcome.DENIED, Outcome.BUSY}:
            metrics.refused(reason_of(error))
        else:
            metrics.executed(self.language, outcome.value, None)


_TAIL_BLOCK = 65_536


def _drop_torn_record(fd: int, path: Path) -> None:
    """Cut the file back to its last complete line, if a crash left a record without its newline."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        block = os.pread(fd, end - start, start)
        if end == size and block.endswith(b"\n"):
            return
        newline = block.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end == size:
        return
    fragment = os.pread(fd, min(size - end, 200), end)
    os.ftruncate(fd, end)
    get_logger(AUDIT_LOGGER).warning(
        "audit_log_repaired",
        path=str(path),
        dropped_bytes=size - end,
        fragment=fragment.decode("utf-8", "replace"),
    )

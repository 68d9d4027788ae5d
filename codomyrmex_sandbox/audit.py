"""The audit trail: a start record and an end record for every execution and every denial.

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codomyrmex_sandbox.backends.base import Job
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import ExecutionRequest, ExecutionResult, Limits

AUDIT_LOGGER = "codomyrmex_sandbox.audit"
SCHEMA_VERSION = 1


def code_digest(code: bytes) -> str:
    return hashlib.sha256(code).hexdigest()


def requested_limits(request: ExecutionRequest | None) -> dict[str, Any]:
    if request is None:
        return {}
    return {"timeout_seconds": request.timeout_seconds, "memory_mb": request.memory_mb}


class AuditLog:
    """Writes audit records to stderr (always) and to an append-only JSON Lines file (if configured)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
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

    def started(self, job: Job, request: ExecutionRequest, client: str | None) -> None:
        self._write(
            "audit.execution_started",
            execution_id=job.execution_id,
            client=client,
            language=request.language,
            code_sha256=code_digest(job.code),
            code_bytes=len(job.code),
            stdin_bytes=None if job.stdin is None else len(job.stdin),
            requested=requested_limits(request),
            limits=job.limits.model_dump(),
        )

    def finished(self, result: ExecutionResult, request: ExecutionRequest, limits: Limits, client: str | None) -> None:
        self._write(
            "audit.execution",
            execution_id=result.execution_id,
            client=client,
            language=result.language,
            runtime=result.runtime,
            requested=requested_limits(request),
            limits=limits.model_dump(),
            status=result.status.value,
            exit_code=result.exit_code,
            signal=result.signal,
            duration_ms=result.duration_ms,
            usage=None if result.usage is None else result.usage.model_dump(),
            stdout_bytes=len(result.stdout.encode("utf-8", "replace")),
            stderr_bytes=len(result.stderr.encode("utf-8", "replace")),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
        )

    def ended_without_result(
        self,
        execution_id: str,
        language: str,
        status: str,
        client: str | None,
        *,
        request: ExecutionRequest | None = None,
        reason: str | None = None,
    ) -> None:
        """A denial (``denied``, ``busy``), an engine failure (``not_run``), or a ``cancelled`` call."""
        self._write(
            "audit.execution",
            execution_id=execution_id,
            client=client,
            language=language,
            requested=requested_limits(request),
            status=status,
            reason=reason,
        )

    def _write(self, event: str, **fields: Any) -> None:  # noqa: ANN401
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

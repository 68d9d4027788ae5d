"""The audit trail: a start record and an end record for every execution and every denial.

Each record is a structlog event on stderr (``audit.execution_started``, ``audit.execution``) and,
when ``audit_log_path`` is set, one JSON line appended to that file. The start record is written
before any sandbox exists, so a crash between start and end still leaves a trace. Records carry a
SHA-256 of the code and its size, never the code itself, and never environment values. The schema
is documented in SECURITY.md.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

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
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self.path is not None and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

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
        if self._file is None:
            return
        record = {
            "schema": SCHEMA_VERSION,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "event": event,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

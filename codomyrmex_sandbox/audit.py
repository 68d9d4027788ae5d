"""One audit record per execution: who, what (a hash, never the code), the limits, the outcome.

Records are structlog events named ``audit.execution``, on stderr with the other logs; a start
record (``audit.execution_started``) is written before the sandbox exists, so a crash between
start and finish still leaves a trace.
"""

from __future__ import annotations

import hashlib
from typing import Any

from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import ExecutionResult, Limits

AUDIT_LOGGER = "codomyrmex_sandbox.audit"


def code_digest(code: bytes) -> str:
    return hashlib.sha256(code).hexdigest()


def record_started(execution_id: str, language: str, code: bytes, limits: Limits, client: str | None) -> None:
    get_logger(AUDIT_LOGGER).info(
        "audit.execution_started",
        execution_id=execution_id,
        client=client,
        language=language,
        code_sha256=code_digest(code),
        code_bytes=len(code),
        limits=limits.model_dump(),
    )


def record_finished(result: ExecutionResult, limits: Limits, client: str | None) -> None:
    get_logger(AUDIT_LOGGER).info(
        "audit.execution",
        execution_id=result.execution_id,
        client=client,
        language=result.language,
        limits=limits.model_dump(),
        status=result.status.value,
        exit_code=result.exit_code,
        signal=result.signal,
        duration_ms=result.duration_ms,
        stdout_bytes=len(result.stdout.encode("utf-8", "replace")),
        stderr_bytes=len(result.stderr.encode("utf-8", "replace")),
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )


def record_ended_without_result(
    execution_id: str,
    language: str,
    status: str,
    client: str | None,
    **detail: Any,  # noqa: ANN401
) -> None:
    """A denial, an engine failure, or a cancelled call: no result was produced."""
    get_logger(AUDIT_LOGGER).info(
        "audit.execution",
        execution_id=execution_id,
        client=client,
        language=language,
        status=status,
        **detail,
    )

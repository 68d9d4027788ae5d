"""The data that crosses the public API: requests, effective limits, results."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from codomyrmex_sandbox.errors import InvalidRequestError

MIB = 1024 * 1024


class Status(StrEnum):
    """How an execution ended; each value is decided from evidence (see MCP_TOOL_SPECIFICATION.md).

    ``CANCELLED`` is part of the tool contract but no result carries it in this version: a call
    is cancelled from outside (an MCP client's ``notifications/cancelled``, the server stopped by a
    signal, the Python caller's task cancelled), and a cancelled call returns nothing: MCP sends no
    response and the Python API re-raises the cancellation once the sandbox is killed. The value
    appears as the ``status`` of the call's audit end record (`codomyrmex_sandbox.audit.Outcome`).
    `backends.base.decide` keeps its rule (a host-ordered kill, first in the order) for a backend
    that stops a run on request and still returns its result; no backend does so yet.
    """

    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"
    CANCELLED = "cancelled"


# The key that names, in a field's schema, the operator's values that bound it: the tool's input
# schema (`codomyrmex_sandbox.schema`) replaces it with those values, e.g. ``maxLength`` with the cap.
FROM_SETTINGS = "x-from-settings"


class ExecutionRequest(BaseModel):
    """What a caller asks to run. Bounds that depend on the operator's policy are checked by the policy.

    The tool's input schema is generated from this model: its descriptions are templates over the
    policy's fields (`LimitPolicy`), and `FROM_SETTINGS` says which of the operator's values bound a field.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    code: str = Field(
        description="The program to run, UTF-8 source of at most {max_code_bytes} bytes.",
        # minLength in the schema only: the policy refuses empty (and blank) code with a clearer message.
        json_schema_extra={"minLength": 1, FROM_SETTINGS: {"maxLength": "max_code_bytes"}},
    )
    language: str = Field(
        default="python",
        description="The runtime to run the code in.",
        json_schema_extra={FROM_SETTINGS: {"enum": "languages"}},
    )
    stdin: str | None = Field(
        default=None,
        description="Text for the program's standard input; without it the program reads EOF.",
        json_schema_extra={FROM_SETTINGS: {"maxLength": "max_stdin_bytes"}},
    )
    timeout_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description="Wall-clock limit; default {default_timeout_seconds:g} s.",
        json_schema_extra={FROM_SETTINGS: {"maximum": "max_timeout_seconds"}},
    )
    memory_mb: Annotated[int, Field(ge=16)] | None = Field(
        default=None,
        description="Memory limit, swap included; default {default_memory_mb} MiB.",
        json_schema_extra={FROM_SETTINGS: {"maximum": "max_memory_mb"}},
    )


class Limits(BaseModel):
    """The effective limits of one execution, after the request was resolved against the policy."""

    model_config = ConfigDict(frozen=True)

    timeout_seconds: float
    memory_mb: int
    cpus: float
    pids: int
    open_files: int
    file_size_mb: int
    scratch_mb: int
    output_bytes: int
    network: Literal["none", "egress"] = "none"


class ResourceUsage(BaseModel):
    """What one execution consumed, read from the kernel's accounting of the whole sandbox."""

    model_config = ConfigDict(frozen=True)

    cpu_time_ms: float | None = Field(description="CPU time of every process in the sandbox, in milliseconds.")
    peak_memory_bytes: int | None = Field(description="Peak memory of the whole sandbox (page cache included).")
    memory_limit_hit: bool = Field(description="True when the sandbox reached its memory limit at least once.")
    oom_kills: int = Field(
        default=0, description="Processes the kernel killed for lack of memory (at least this many)."
    )


class ExecutionResult(BaseModel):
    """The outcome of a program that ran. Field names are part of the tool contract."""

    model_config = ConfigDict(frozen=True)

    execution_id: str = Field(description="Unique id; the same id appears in the audit log.")
    status: Status = Field(description="How the execution ended, decided from evidence.")
    exit_code: int | None = Field(description="The program's exit code when it exited by itself, else null.")
    signal: str | None = Field(description='The signal that killed the program, e.g. "SIGKILL", else null.')
    stdout: str = Field(description="Standard output, decoded as UTF-8 with replacement, up to the cap.")
    stderr: str = Field(description="Standard error, decoded as UTF-8 with replacement, up to the cap.")
    stdout_truncated: bool = Field(description="True when stdout passed the output cap.")
    stderr_truncated: bool = Field(description="True when stderr passed the output cap.")
    return_value: str | None = Field(
        description="Python: repr() of the value of a final expression statement; null otherwise."
    )
    duration_ms: float = Field(description="Wall time of the program itself, start to exit, in milliseconds.")
    language: str = Field(description='The language that ran, e.g. "python".')
    runtime: str = Field(description='The runtime and its version, e.g. "python 3.11.2".')
    usage: ResourceUsage | None = Field(
        default=None, description="Resources used, from the kernel's cgroup accounting; null where unavailable."
    )

    def render_text(self) -> str:
        """A short human-readable rendering: status line, then stdout, then stderr."""
        head = f"status: {self.status.value}"
        if self.exit_code is not None:
            head += f" (exit code {self.exit_code})"
        if self.signal is not None:
            head += f" (signal {self.signal})"
        head += f" in {self.duration_ms:.0f} ms, {self.runtime}"
        if self.usage is not None and self.usage.peak_memory_bytes is not None:
            head += f", peak memory {self.usage.peak_memory_bytes / MIB:.1f} MiB"
        parts = [head]
        if self.return_value is not None:
            parts.append(f"return value: {self.return_value}")
        for name, text, cut in (
            ("stdout", self.stdout, self.stdout_truncated),
            ("stderr", self.stderr, self.stderr_truncated),
        ):
            if text or cut:
                parts.append(f"--- {name}{' (truncated)' if cut else ''} ---\n{text}")
        return "\n".join(parts)


def request_from_arguments(arguments: Mapping[str, Any]) -> ExecutionRequest:
    """Validate tool or API arguments; raises InvalidRequestError naming each wrong argument."""
    try:
        return ExecutionRequest.model_validate(dict(arguments))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in err["loc"]) or "arguments"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown argument {where!r} (accepted: {', '.join(ExecutionRequest.model_fields)})")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise InvalidRequestError("invalid arguments: " + "; ".join(problems) + ".") from exc

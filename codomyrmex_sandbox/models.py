"""The data that crosses the public API: requests, effective limits, results."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from codomyrmex_sandbox.errors import InvalidRequestError
from codomyrmex_sandbox.excerpt import Excerpt, excerpt

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


# -- every tool's arguments: strict types, with the lenient forms that mean one thing -------------
#
# Client libraries send arguments in forms that a strict validator refuses although each means one
# thing: converters in strict mode send every field, ``null`` for those the model left unset; a
# model writes ``64.0`` for an integer; some clients send a number as the string it was typed as
# (the MCP Inspector CLI, unless the type is exactly "number"/"integer"; models that quote numbers).
# These are accepted; anything else is refused with a message that says what to send.
# A tool's argument model derives from `ToolArguments` and ends each number's annotations with
# `LENIENT_INT` or `LENIENT_NUMBER`, after its bounds: ``Annotated[int, Field(ge=16), LENIENT_INT]``
# (bounds placed after it are still checked but leave the schema without ``minimum``/``maximum``,
# which `schema.flat_schema` then refuses). `validate_arguments` turns its validation errors into
# one `InvalidRequestError`.

# A numeric string holds exactly one JSON number: no spaces, sign "+", units, hex, NaN or infinity.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SHOWN_CHARS = 40  # how much of a refused string a message quotes


def _refused(message: str, **context: object) -> PydanticCustomError:
    return PydanticCustomError("lenient_number", message, context)


def _number(value: object) -> int | float:
    """The number ``value`` stands for: an int or a finite float, as itself or as a numeric string."""
    if isinstance(value, bool):  # before int: a bool is an int in Python, never a number in JSON
        raise _refused("Input should be a number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _refused("Input should be a finite number, not NaN or infinity")
        return value
    if isinstance(value, str):
        return _numeric_string(value)
    raise _refused("Input should be a number, not {kind}", kind=_kind(value))


def _numeric_string(value: str) -> int | float:
    if _JSON_NUMBER.fullmatch(value) is None:
        shown = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
        raise _refused(
            "Input should be a number; the string {shown} is not one (send a plain number such as 30, or a "
            'string holding only one, such as "30")',
            shown=repr(shown),
        )
    try:
        number: int | float = float(value) if any(mark in value for mark in ".eE") else int(value)
    except ValueError:  # more digits than Python converts (4300): far above every cap anyway
        raise _refused("Input should be a number of at most 4300 digits") from None
    if not math.isfinite(number):  # "1e999"
        raise _refused("Input should be a finite number; {shown} is too large", shown=repr(value))
    return number


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def _lenient_int(value: object) -> int:
    number = _number(value)
    if isinstance(number, float):
        if not number.is_integer():
            raise _refused("Input should be a whole number, not {value}", value=number)
        return int(number)
    return number


def _lenient_float(value: object) -> float:
    return float(_number(value))


# An integer argument accepts a whole-number float (``64.0``) or a numeric string (``"64"``, ``"64.0"``).
LENIENT_INT = BeforeValidator(_lenient_int)
# A number argument accepts a numeric string (``"5"`` is 5.0).
LENIENT_NUMBER = BeforeValidator(_lenient_float)


class ToolArguments(BaseModel):
    """The base of every tool's argument model: strict types, unknown arguments refused, and
    ``null`` for an optional argument meaning its default (a required one stays refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: object) -> object:
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {
            name: value
            for name, value in data.items()
            if name not in fields
            or fields[name].is_required()
            or not (value is None or (value == "" and name in cls._EMPTY_MEANS_THE_DEFAULT))
        }

    # Optional string arguments where "" can only mean "not set": what a model bound by a
    # strict-mode schema (every field required) sends for them (`ExecutionRequest.language`, ...).
    _EMPTY_MEANS_THE_DEFAULT: ClassVar[frozenset[str]] = frozenset()


ArgumentsT = TypeVar("ArgumentsT", bound=ToolArguments)


def validate_arguments(model: type[ArgumentsT], arguments: Mapping[str, Any]) -> ArgumentsT:
    """Validate a tool's (or the Python API's) arguments; raises InvalidRequestError naming each wrong one."""
    try:
        return model.model_validate(dict(arguments))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = err["loc"]
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
            if err["type"] == "extra_forbidden" and len(loc) == 1:
                problems.append(f"unknown argument {where!r} (accepted: {', '.join(model.model_fields)})")
            elif err["type"] == "extra_forbidden":
                parent = where[: -len(str(loc[-1])) - 1]
                accepted = ", ".join(_fields_at(model, loc[:-1]))
                problems.append(f"{parent}: unknown field {str(loc[-1])!r} (accepted: {accepted})")
            else:
                problems.append(f"{where or 'arguments'}: {err['msg']}")
        raise InvalidRequestError("invalid arguments: " + "; ".join(problems) + ".") from exc


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model nested in ``model`` at ``loc`` (list indexes skipped)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _model_in(current.model_fields[part].annotation)
        if current is None:
            return []
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:  # noqa: ANN401 - any type annotation
    """The model class an annotation holds (``list[M] | None`` -> M), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


# The smallest timeout a call may ask for: a real, inclusive bound, so that the schema's ``minimum``
# and the server's check are the same rule (converters refuse ``exclusiveMinimum``).
MIN_TIMEOUT_SECONDS = 0.001


class InputFile(ToolArguments):
    """One file to place in the sandbox's working directory before the program starts."""

    path: str = Field(
        description="Relative POSIX path under the working directory, e.g. data/input.csv: no leading /, "
        "no . or .. component, at most 255 bytes per component and 1024 in all.",
        json_schema_extra={"minLength": 1, "maxLength": 1024},
    )
    content: str = Field(description="The file's content: UTF-8 text, or base64 when encoding is base64.")
    encoding: Literal["utf-8", "base64"] = Field(
        default="utf-8", description="How content is encoded: utf-8 (text) or base64 (binary). Default utf-8."
    )


SESSION_ID_MAX_CHARS = 64  # an id is "s_" and 43 URL-safe base64 characters (256 bits)

EndedReason = Literal["timeout", "memory_limit", "output_limit", "killed", "exit"]


class SessionState(BaseModel):
    """Where a session stands after one of its calls: the truth about what its next call will see."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(description="The session the call ran in.")
    call_index: int = Field(description="This call's number in the session, 1 for the first.")
    state: Literal["kept", "ended"] = Field(
        description="kept: the interpreter survived; variables, imports, functions, the current directory and "
        "the working directory's files are all there for the next call. ended: the session is gone (see "
        "ended_reason); the next call with its id fails and a new session must be created."
    )
    ended_reason: EndedReason | None = Field(
        description="Why the session ended: timeout, memory_limit, output_limit, killed (the interpreter died), "
        "exit (the program left the interpreter); null while it is kept."
    )


class ExecutionRequest(ToolArguments):
    """What a caller asks to run. Bounds that depend on the operator's policy are checked by the policy.

    An empty ``language`` is the default (in a session, the session's), an empty ``session_id`` no
    session: strict-mode clients send every field.

    The tool's input schema is generated from this model: its descriptions are templates over the
    policy's fields (`LimitPolicy`), and `FROM_SETTINGS` says which of the operator's values bound a field.
    An optional field's description states its default (the schema carries no ``default`` keyword).
    """

    _EMPTY_MEANS_THE_DEFAULT: ClassVar[frozenset[str]] = frozenset({"language", "session_id"})

    code: str = Field(
        description="The program to run, UTF-8 source of at most {max_code_bytes} bytes.",
        # minLength in the schema only: the policy refuses empty (and blank) code with a clearer message.
        json_schema_extra={"minLength": 1, FROM_SETTINGS: {"maxLength": "max_code_bytes"}},
    )
    language: str = Field(
        default="python",
        description="The runtime to run the code in. Default python.",
        json_schema_extra={FROM_SETTINGS: {"enum": "languages"}},
    )
    stdin: str | None = Field(
        default=None,
        description="Text for the program's standard input; without it the program reads EOF.",
        json_schema_extra={FROM_SETTINGS: {"maxLength": "max_stdin_bytes"}},
    )
    timeout_seconds: Annotated[float, Field(ge=MIN_TIMEOUT_SECONDS, allow_inf_nan=False), LENIENT_NUMBER] | None = (
        Field(
            default=None,
            description="Wall-clock limit in seconds; default {default_timeout_seconds:g} s.",
            json_schema_extra={FROM_SETTINGS: {"maximum": "max_timeout_seconds"}},
        )
    )
    memory_mb: Annotated[int, Field(ge=16), LENIENT_INT] | None = Field(
        default=None,
        description="Memory limit in MiB, swap included; default {default_memory_mb} MiB.",
        json_schema_extra={FROM_SETTINGS: {"maximum": "max_memory_mb"}},
    )
    files: list[InputFile] | None = Field(
        default=None,
        description="Files to place in the working directory (/sandbox) before the program starts, e.g. "
        "data to analyse or a project whose tests to run: at most {max_input_files} files and "
        "{max_input_bytes} bytes in all (decoded). Default none. Files the program creates or changes there "
        "come back in the result's files, and Python's matplotlib figures in its figures.",
        json_schema_extra={FROM_SETTINGS: {"maxItems": "max_input_files"}},
    )
    session_id: str | None = Field(
        default=None,
        description="Run in this session (from create_session), whose interpreter keeps variables, imports, "
        "functions, the current directory and files from call to call. Default none: a fresh sandbox that "
        "keeps nothing. With a session, language may be left out, memory_mb is the session's (leave it out), "
        "and timeout_seconds applies to this call alone.",
        json_schema_extra={"maxLength": SESSION_ID_MAX_CHARS},
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
    output_files: int = 32
    output_file_bytes: int = 4 * MIB
    output_files_bytes: int = 16 * MIB
    figures: int = 16


class ResourceUsage(BaseModel):
    """What one execution consumed, read from the kernel's accounting of the whole sandbox."""

    model_config = ConfigDict(frozen=True)

    cpu_time_ms: float | None = Field(description="CPU time of every process in the sandbox, in milliseconds.")
    peak_memory_bytes: int | None = Field(description="Peak memory of the whole sandbox (page cache included).")
    memory_limit_hit: bool = Field(description="True when the sandbox reached its memory limit at least once.")
    oom_kills: int = Field(
        default=0, description="Processes the kernel killed for lack of memory (at least this many)."
    )


OmittedReason = Literal["too_large", "over_total", "over_count", "not_regular"]


class ReturnedFile(BaseModel):
    """A file the program created or changed under the working directory, or a figure it made.

    ``content`` is for the Python API only: the MCP result carries the bytes as content blocks
    (an image, or an embedded resource), never in its structured content.
    """

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Path relative to the working directory; a figure is figure-N.png.")
    size_bytes: int = Field(description="The file's full size in bytes.")
    mime_type: str = Field(description="From the name and the content, e.g. image/png, text/csv.")
    sha256: str = Field(description="SHA-256 of the full content, hex; empty for a not_regular entry (never read).")
    text: str | None = Field(description="The content when it is valid UTF-8 text and was returned, else null.")
    omitted: OmittedReason | None = Field(
        description="Why the content was not returned (too_large, over_total, over_count, not_regular: "
        "a link, fifo or device, listed but never followed or read); null when it was."
    )
    content: bytes | None = Field(default=None, exclude=True, repr=False)


class ExecutionResult(BaseModel):
    """The outcome of a program that ran. Field names are part of the tool contract.

    The Python API returns the whole captured output (every ``*_omitted_bytes`` is 0); the MCP
    adapter sends `for_model`'s excerpt of it, sized for a model's context.
    """

    model_config = ConfigDict(frozen=True)

    execution_id: str = Field(description="Unique id; the same id appears in the audit log.")
    status: Status = Field(description="How the execution ended, decided from evidence.")
    exit_code: int | None = Field(description="The program's exit code when it exited by itself, else null.")
    signal: str | None = Field(description='The signal that killed the program, e.g. "SIGKILL", else null.')
    stdout: str = Field(
        description="Standard output, decoded as UTF-8 with replacement, up to the cap; when long, only its head "
        "and tail, around a marker line (see stdout_omitted_bytes)."
    )
    stderr: str = Field(
        description="Standard error, decoded as UTF-8 with replacement, up to the cap; when long, only its head "
        "and tail, around a marker line (see stderr_omitted_bytes)."
    )
    stdout_truncated: bool = Field(description="True when stdout passed the output cap.")
    stderr_truncated: bool = Field(description="True when stderr passed the output cap.")
    stdout_omitted_bytes: int = Field(
        default=0,
        description="Bytes of stdout (UTF-8) left out of this result between its head and its tail, "
        "where a marker line stands for them; 0 when stdout is whole.",
    )
    stderr_omitted_bytes: int = Field(
        default=0,
        description="Bytes of stderr (UTF-8) left out of this result between its head and its tail, "
        "where a marker line stands for them; 0 when stderr is whole.",
    )
    return_value: str | None = Field(
        description="Python: repr() of the value of a final expression statement; null otherwise."
    )
    return_value_omitted_bytes: int = Field(
        default=0,
        description="Bytes of return_value (UTF-8) left out of this result between its head and its "
        "tail, where a marker line stands for them; 0 when it is whole or null.",
    )
    duration_ms: float = Field(description="Wall time of the program itself, start to exit, in milliseconds.")
    language: str = Field(description='The language that ran, e.g. "python".')
    runtime: str = Field(description='The runtime and its version, e.g. "python 3.11.2".')
    usage: ResourceUsage | None = Field(
        default=None, description="Resources used, from the kernel's cgroup accounting; null where unavailable."
    )
    files: list[ReturnedFile] = Field(
        default_factory=list,
        description="Regular files under the working directory that the program created or changed (and "
        "links, fifos and devices, listed as not_regular), sorted by path; content as content blocks.",
    )
    figures: list[ReturnedFile] = Field(
        default_factory=list,
        description="Python: the matplotlib figures shown or left open, as PNG, in creation order.",
    )
    files_unlisted: int = Field(
        default=0, description="Created or changed files found beyond the listing's cap and not listed."
    )
    files_complete: bool = Field(
        default=True,
        description="False when the files could not all be looked at (the collection's time bound, or a "
        "program that did not end by itself: timeout, output limit); files then lists what was seen.",
    )
    session: SessionState | None = Field(
        default=None,
        description="For a call in a session: its number and whether the session's state was kept; null "
        "for a call without a session.",
    )

    def render_text(self) -> str:  # noqa: C901 - one line per part of the result
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
        for name, entries in (("files", self.files), ("figures", self.figures)):
            if entries:
                parts.append(f"--- {name} ---")
                parts.extend(_entry_line(entry) for entry in entries)
        if self.files_unlisted:
            parts.append(f"({self.files_unlisted} more created or changed files not listed)")
        if not self.files_complete:
            parts.append("(the files could not all be collected; the list may be incomplete)")
        if self.session is not None:
            parts.append(_session_line(self.session))
        return "\n".join(parts)

    def for_model(self, limit: int) -> ExecutionResult:
        """This result sized for a model: stdout, stderr and return_value each at most ``limit`` UTF-8 bytes.

        A text over the limit keeps its head and its tail around one marker line that says how many
        bytes were left out; the matching ``*_omitted_bytes`` field counts them exactly. Streams
        give the tail three quarters of the room (errors come last); the return value, a repr,
        gives each end half. Returns this result itself when everything fits. Reads O(limit)
        characters of each text, plus one pass of the C encoder over a non-ASCII text to count its
        bytes (see `codomyrmex_sandbox.excerpt`).
        """
        stdout = excerpt(self.stdout, limit, "stdout")
        stderr = excerpt(self.stderr, limit, "stderr")
        value = None if self.return_value is None else excerpt(self.return_value, limit, "return_value", head_share=0.5)
        if not stdout.omitted_bytes and not stderr.omitted_bytes and (value is None or not value.omitted_bytes):
            return self
        return self.model_copy(update=_excerpt_fields(self, stdout, stderr, value))


def _session_line(session: SessionState) -> str:
    where = f"session {session.session_id}, call {session.call_index}"
    if session.state == "kept":
        return f"({where}: state kept for the next call)"
    return (
        f"({where}: the session ended ({session.ended_reason}); its state is gone, and a next call needs "
        "a new session from create_session)"
    )


def _entry_line(entry: ReturnedFile) -> str:
    line = f"{entry.path} ({entry.size_bytes} bytes, {entry.mime_type})"
    return line if entry.omitted is None else f"{line}, not returned: {entry.omitted}"


def _excerpt_fields(result: ExecutionResult, stdout: Excerpt, stderr: Excerpt, value: Excerpt | None) -> dict[str, Any]:
    """The fields of ``result`` that its excerpts replace; omitted counts add to any it had."""
    return {
        "stdout": stdout.text,
        "stderr": stderr.text,
        "stdout_omitted_bytes": result.stdout_omitted_bytes + stdout.omitted_bytes,
        "stderr_omitted_bytes": result.stderr_omitted_bytes + stderr.omitted_bytes,
        "return_value": None if value is None else value.text,
        "return_value_omitted_bytes": result.return_value_omitted_bytes + (0 if value is None else value.omitted_bytes),
    }


def request_from_arguments(arguments: Mapping[str, Any]) -> ExecutionRequest:
    """Validate `execute_code`'s arguments (the tool's or the Python API's); raises InvalidRequestError."""
    return validate_arguments(ExecutionRequest, arguments)


# -- sessions (see MCP_TOOL_SPECIFICATION.md, "Sessions") -------------------------------------------


class CreateSessionRequest(ToolArguments):
    """What `create_session` asks for. Bounds that depend on the operator's policy are checked by it."""

    _EMPTY_MEANS_THE_DEFAULT: ClassVar[frozenset[str]] = frozenset({"language"})

    language: str = Field(
        default="python",
        description="The runtime the session's interpreter runs. Default python.",
        json_schema_extra={FROM_SETTINGS: {"enum": "languages"}},
    )
    memory_mb: Annotated[int, Field(ge=16), LENIENT_INT] | None = Field(
        default=None,
        description="Memory limit of the whole session in MiB, swap included; default {default_memory_mb} MiB.",
        json_schema_extra={FROM_SETTINGS: {"maximum": "max_memory_mb"}},
    )
    files: list[InputFile] | None = Field(
        default=None,
        description="Files to place in the session's working directory (/sandbox) before its first call: at "
        "most {max_input_files} files and {max_input_bytes} bytes in all (decoded). Default none.",
        json_schema_extra={FROM_SETTINGS: {"maxItems": "max_input_files"}},
    )
    idle_timeout_seconds: Annotated[float, Field(ge=1, allow_inf_nan=False), LENIENT_NUMBER] | None = Field(
        default=None,
        description="End the session after this many seconds without a call; default "
        "{session_idle_timeout_seconds:g} s, at most that.",
        json_schema_extra={FROM_SETTINGS: {"maximum": "session_idle_timeout_seconds"}},
    )


class CloseSessionRequest(ToolArguments):
    """What `close_session` asks for."""

    session_id: str = Field(
        description="The session to end, from create_session.",
        json_schema_extra={"minLength": 1, "maxLength": SESSION_ID_MAX_CHARS},
    )


class ListSessionsRequest(ToolArguments):
    """`list_sessions` takes no arguments."""


class WrittenFile(BaseModel):
    """A file written into a session's working directory when it was created."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Path relative to the working directory.")
    size_bytes: int = Field(description="Its size in bytes.")
    sha256: str = Field(description="SHA-256 of its content, hex.")


class CreatedSession(BaseModel):
    """A session that is open and waiting for its first call. Field names are part of the tool contract."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(description="Pass it as execute_code's session_id; only this client can use it.")
    language: str = Field(description="The language of the session's interpreter.")
    runtime: str = Field(description='The runtime and its version, e.g. "python 3.11.2".')
    limits: Limits = Field(description="The limits every call of the session runs under (timeout: the default).")
    idle_timeout_seconds: float = Field(description="The session ends after this long without a call.")
    expires_at: datetime = Field(description="The session's hard end (ISO 8601, UTC), however busy it is.")
    files: list[WrittenFile] = Field(description="The files written into the working directory.")


class ClosedSession(BaseModel):
    """A session that `close_session` ended."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(description="The session that ended.")
    calls: int = Field(description="How many calls ran in it.")
    usage: ResourceUsage | None = Field(
        description="The whole session's CPU time and peak memory, where the kernel's accounting is readable."
    )


class SessionSummary(BaseModel):
    """One open session, as `list_sessions` shows it."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    language: str
    calls: int = Field(description="How many calls ran in it so far.")
    idle_expires_at: datetime = Field(description="When it ends unless a call comes first (ISO 8601, UTC).")
    expires_at: datetime = Field(description="Its hard end (ISO 8601, UTC).")


class SessionList(BaseModel):
    """The caller's open sessions."""

    model_config = ConfigDict(frozen=True)

    sessions: list[SessionSummary] = Field(description="The caller's open sessions, oldest first.")

"""Files in and files and figures out, on the host's side of the boundary.

In: `check_files` turns a request's ``files`` into bytes under the policy's limits, refusing with a
message that names the entry and the rule; `workspace_payload` frames them for the sandbox's init
(`protocol.workspace_header`), which writes them into the working directory before the runner
gets its input. The host never writes into a directory a sandbox can see.

Out: the init reports, once the program has ended and everything else in the sandbox is dead, what
the program left in the working directory, in trailers under a nonce no sandbox process knows; the
Python runner reports figures under the runner's nonce (which the program shares, so figures are
as trustworthy as the program that drew them). `collect` reads both as untrusted data: every
field is checked, content is hashed again here and must match its size and hash, paths must obey
the upload rules, and the caps are applied again, so a bug or a forgery can drop an entry but
never smuggle one past the rules. Nothing here opens a path: names are data.

`guard_trailers` is the init's selection rules in Python, for the fake backend and the tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from codomyrmex_sandbox import protocol
from codomyrmex_sandbox.errors import InvalidRequestError
from codomyrmex_sandbox.models import MIB, InputFile, OmittedReason, ReturnedFile

if TYPE_CHECKING:
    from codomyrmex_sandbox.models import Limits
    from codomyrmex_sandbox.settings import LimitPolicy

MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_LISTED = 1000  # entries listed at most; past it the result only counts them (files_unlisted)
PAGE = 4096  # tmpfs stores every file and directory in whole pages
OMITTED: frozenset[str] = frozenset({"too_large", "over_total", "over_count", "not_regular"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Characters that make a name lie about itself when shown: line and paragraph separators, and the
# bidirectional overrides and isolates that reorder what a reader sees.
_DECEPTIVE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_BASE64_SPACE = b" \t\r\n"
_SHA256_HEX = re.compile(rb"[0-9a-f]{64}")


@dataclass(frozen=True)
class UploadedFile:
    """One checked upload: its path and its bytes."""

    path: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


# -- in ------------------------------------------------------------------------------------------


def path_problem(path: str) -> str | None:  # noqa: PLR0911 - one return per rule reads best
    """What is wrong with ``path`` as a file's place under the working directory, or None.

    The spec's rules (relative POSIX path, no ``.``/``..``/empty component, no NUL or control
    character, 255 bytes a component, 1,024 in all), and two more that keep a name from lying or
    from meaning something else on the client's machine: no backslash (a separator on Windows),
    no line separators or bidirectional controls, and no component that Unicode compatibility
    folds into ``.`` or ``..`` (two fullwidth full stops, U+FF0E).
    """
    if not path:
        return "it is empty"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    if len(encoded) > MAX_PATH_BYTES:
        return f"it is {len(encoded)} bytes long; the limit is {MAX_PATH_BYTES}"
    bad = next((c for c in path if unicodedata.category(c) == "Cc" or c in _DECEPTIVE), None)
    if bad is not None:
        return f"it contains the control character U+{ord(bad):04X}"
    if path.startswith("/"):
        return "it starts with / (paths are relative to the working directory, /sandbox)"
    if "\\" in path:
        return "it contains a backslash; separate directories with /"
    return next(filter(None, map(_component_problem, path.split("/"))), None)


def _component_problem(component: str) -> str | None:
    if not component:
        return "it has an empty component (// or a trailing /)"
    if component in {".", ".."}:
        return f"it has a {component!r} component; name the file by its plain relative path"
    folded = unicodedata.normalize("NFKC", component)
    if folded in {".", ".."} or "/" in folded or "\\" in folded:
        return f"its component {component!r} reads as {folded!r}"
    if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"a component is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def check_files(
    files: Sequence[InputFile | UploadedFile] | None, policy: LimitPolicy, *, language: str = "python"
) -> tuple[UploadedFile, ...]:
    """The uploads as bytes, or an InvalidRequestError naming the entry and the rule it breaks.

    Entries are the tool's (`InputFile`, text or base64) or, from the Python API, bytes already
    (`UploadedFile`): the same rules apply to both.
    """
    if not files:
        return ()
    if len(files) > policy.max_input_files:
        raise InvalidRequestError(
            f"files has {len(files)} entries, above this server's cap of {policy.max_input_files} for "
            f"{language}; upload fewer (an archive the program unpacks counts as one)."
        )
    uploads: list[UploadedFile] = []
    seen: dict[str, int] = {}
    total = 0
    for index, entry in enumerate(files):
        where = f"files[{index}] ({entry.path[:80]!r})"
        problem = path_problem(entry.path)
        if problem is not None:
            raise InvalidRequestError(f"{where}: the path is refused: {problem}.")
        if entry.path in seen:
            raise InvalidRequestError(f"{where}: the same path as files[{seen[entry.path]}]; each path once.")
        seen[entry.path] = index
        data = entry.data if isinstance(entry, UploadedFile) else _decoded(entry, where)
        if len(data) > policy.file_size_mb * MIB:
            raise InvalidRequestError(
                f"{where}: {len(data)} bytes, above the sandbox's largest file ({policy.file_size_mb} MiB)."
            )
        total += len(data)
        if total > policy.max_input_bytes:
            raise InvalidRequestError(
                f"{where}: the files add up to more than this server's cap of {policy.max_input_bytes} bytes "
                f"(decoded) for {language}; upload less."
            )
        uploads.append(UploadedFile(entry.path, data))
    _check_tree(uploads)
    _check_fits(uploads, policy.scratch_mb * MIB)
    return tuple(uploads)


def _decoded(entry: InputFile, where: str) -> bytes:
    if entry.encoding == "utf-8":
        try:
            return entry.content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{where}: the content is not valid Unicode (a lone surrogate at {exc.start}); send UTF-8 "
                "text, or the bytes as base64 with encoding base64."
            ) from exc
    try:
        raw = entry.content.encode("ascii")
        decoded = _b64(raw)
        if decoded is None:  # MIME-wrapped base64: its line breaks are not data
            decoded = binascii.a2b_base64(raw.translate(None, _BASE64_SPACE), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        hint = " (that is the URL-safe alphabet; use + and /)" if any(c in entry.content for c in "-_") else ""
        raise InvalidRequestError(
            f"{where}: the content is not valid base64{hint}; send standard base64 with = padding, "
            "or text with encoding utf-8."
        ) from exc
    return decoded


def _check_tree(uploads: Sequence[UploadedFile]) -> None:
    """Refuse a file that another upload needs as a directory (``a`` and ``a/b``)."""
    files = {upload.path: index for index, upload in enumerate(uploads)}
    for index, upload in enumerate(uploads):
        parts = upload.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise InvalidRequestError(
                    f"files[{index}] ({upload.path[:80]!r}) needs {parent!r} to be a directory, but "
                    f"files[{files[parent]}] is a file of that name; rename one of them."
                )


def _check_fits(uploads: Sequence[UploadedFile], scratch: int) -> None:
    """Refuse uploads that cannot fit the working directory's tmpfs (whole pages per file and directory)."""
    directories = {"/".join(u.path.split("/")[:depth]) for u in uploads for depth in range(1, u.path.count("/") + 1)}
    pages = sum(-(-len(u.data) // PAGE) for u in uploads) + len(directories)
    if pages * PAGE > scratch:
        raise InvalidRequestError(
            f"the files need {pages * PAGE} bytes of the working directory, which holds {scratch} bytes "
            "(scratch_mb); upload less."
        )


def workspace_payload(
    uploads: Sequence[UploadedFile],
    guard_nonce: str,
    limits: Limits,
    budget_seconds: float,
    *,
    session_lifetime_seconds: float | None = None,
) -> bytes:
    """The init's header line and the files, which precede the runner's input on the lease; with
    ``session_lifetime_seconds``, the header that opens a session of that hard end."""
    files = protocol.files_section([(u.path.encode("utf-8"), u.data) for u in uploads])
    bounds = {
        "max_returned": limits.output_files,
        "max_file_bytes": limits.output_file_bytes,
        "max_total_bytes": limits.output_files_bytes,
        "max_listed": MAX_LISTED,
        "budget_ms": max(1, round(budget_seconds * 1000)),
    }
    if session_lifetime_seconds is None:
        return protocol.workspace_header(guard_nonce, files, **bounds) + files
    lifetime_ms = max(1, round(session_lifetime_seconds * 1000))
    return protocol.session_header(guard_nonce, files, lifetime_ms=lifetime_ms, **bounds) + files


def trailer_limit(max_file_bytes: int) -> int:
    """The longest file or figure trailer a sandbox may send: base64 content and the other fields."""
    return 4 * -(-max_file_bytes // 3) + 4 * MAX_PATH_BYTES * 2 + 256


def entry_room(limits: Limits) -> dict[protocol.TrailerKey, int]:
    """How many bytes of ``fig`` and of ``file`` trailers the host keeps at most for one execution:
    the content the caps allow, base64, and a listing's worth of the other fields."""
    listing = MAX_LISTED * trailer_limit(0)
    return {
        protocol.FIGURE: 4 * -(-limits.figures * limits.output_file_bytes // 3) + listing,
        protocol.FILE: 4 * -(-limits.output_files_bytes // 3) + listing,
    }


# -- out -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collected:
    """What came out of one execution's workspace."""

    files: list[ReturnedFile]
    figures: list[ReturnedFile]
    unlisted: int
    complete: bool


def collect(
    file_trailers: Sequence[bytes],
    figure_trailers: Iterable[bytes],
    files_end: bytes | None,
    limits: Limits,
    *,
    expected: bool = True,
) -> Collected:
    """The result's files and figures from the trailers' values, each checked as untrusted data.

    ``expected`` is False where no collection ran (a backend without a workspace): then an absent
    end trailer does not make the result incomplete.
    """
    files: list[ReturnedFile] = []
    complete = files_end is not None or not expected
    budget = _Budget(limits.output_files, limits.output_file_bytes, limits.output_files_bytes)
    seen: set[str] = set()
    for value in file_trailers:
        entry = _file_entry(value, budget)
        if entry is None or entry.path in seen or len(files) >= MAX_LISTED:
            complete = False  # dropped: malformed, a duplicate, or past the listing's cap
            continue
        seen.add(entry.path)
        files.append(entry)
    unlisted = 0
    if files_end is not None:
        parsed = _files_end(files_end)
        if parsed is None:
            complete = False
        else:
            listed, unlisted, finished = parsed
            # Fewer entries than the init wrote: some were lost on the way (in a session, a background
            # process writing while the init reports can split an entry).
            complete = complete and finished and listed == len(file_trailers)
    figures = _figures(figure_trailers, limits)
    files.sort(key=lambda entry: entry.path.encode("utf-8", "surrogatepass"))
    return Collected(files, figures, unlisted, complete)


class _Budget:
    """The caps on returned content, applied again on the host in the order entries arrive."""

    def __init__(self, count: int, each: int, total: int) -> None:
        self.count, self.each, self.total = count, each, total

    def admit(self, size: int) -> OmittedReason | None:
        if size > self.each:
            return "too_large"
        if self.count <= 0:
            return "over_count"
        if size > self.total:
            return "over_total"
        self.count -= 1
        self.total -= size
        return None


def _file_entry(value: bytes, budget: _Budget) -> ReturnedFile | None:  # noqa: C901, PLR0911 - one rule a return
    fields = _fields(value, 5)  # path, size, sha256, omitted; content
    if fields is None:
        return None
    (raw_path, raw_size, raw_sha, raw_omitted), raw_content = fields
    path_bytes = _b64(raw_path)
    size = _size(raw_size)
    if path_bytes is None or size is None:
        return None
    try:
        path = path_bytes.decode("utf-8")
    except UnicodeDecodeError:
        path = path_bytes.decode("utf-8", "replace")  # a name that is not UTF-8: shown, never written
    if path_problem(path) is not None:
        if not _only_unwritable(path):
            return None  # a path the rules forbid (.., absolute): not a place under the working directory
        path = _shown(path)  # a control character in a name must not reach a terminal or a model raw
    omitted = raw_omitted.decode("ascii", "replace")
    if omitted == "not_regular":
        return _returned(path, size, "", "not_regular")
    if not _SHA256_HEX.fullmatch(raw_sha):
        return None
    sha = raw_sha.decode("ascii")
    if omitted != "-":
        if omitted not in OMITTED or raw_content.tobytes() != b"-":
            return None
        return _returned(path, size, sha, cast("OmittedReason", omitted))
    content = _b64(raw_content)
    if content is None or len(content) != size or hashlib.sha256(content).hexdigest() != sha:
        return None
    # Past a cap the init should have applied, the entry is listed and its content dropped.
    return _returned(path, size, sha, budget.admit(size), content)


def _returned(
    path: str, size: int, sha: str, omitted: OmittedReason | None, seen: bytes | None = None, *, mime: str | None = None
) -> ReturnedFile:
    """An entry of ``files`` or ``figures``. ``seen`` is the content that came, which gives the
    media type (unless ``mime`` does) and is returned only when nothing is ``omitted``; its text is
    decoded once."""
    content = seen if omitted is None else None
    text = None if content is None else _text(content)
    media = mime or _mime(path, seen, is_text=None if content is None else text is not None)
    return ReturnedFile(
        path=path, size_bytes=size, mime_type=media, sha256=sha, text=text, omitted=omitted, content=content
    )


def _shown(path: str) -> str:
    """A name with its control, line-separator and bidirectional characters written as ``\\uXXXX``."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cc" or c in _DECEPTIVE else c for c in path)


def _only_unwritable(path: str) -> bool:
    """A name the program could make but an upload could not (a control character, a backslash):
    listed (see `_shown`), since the sandbox's own tree holds it; `saving.save_returned` refuses it."""
    if path.startswith("/") or any(part in {"", ".", ".."} for part in path.split("/")):
        return False
    return len(path.encode("utf-8", "replace")) <= 4096  # noqa: PLR2004 - PATH_MAX


def _figures(trailers: Iterable[bytes], limits: Limits) -> list[ReturnedFile]:
    figures: list[ReturnedFile] = []
    returned = 0
    for value in trailers:
        if len(figures) >= max(limits.figures, 0) + MAX_LISTED:
            break
        path = f"figure-{len(figures) + 1}.png"
        entry = _figure(value, path, limits, returned)
        if entry is not None:
            returned += entry.omitted is None
            figures.append(entry)
    return figures


def _figure(value: bytes, path: str, limits: Limits, returned: int) -> ReturnedFile | None:  # noqa: PLR0911
    fields = _fields(value, 4)  # size, sha256, omitted; content
    if fields is None:
        return None
    (raw_size, raw_sha, raw_omitted), raw_content = fields
    size = _size(raw_size)
    if size is None:
        return None
    omitted = raw_omitted.decode("ascii", "replace")
    if omitted != "-":
        if omitted not in {"too_large", "over_count"} or raw_content.tobytes() != b"-":
            return None
        sha = raw_sha.decode("ascii") if _SHA256_HEX.fullmatch(raw_sha) else ""
        return _returned(path, size, sha, cast("OmittedReason", omitted), mime="image/png")
    content = _b64(raw_content)
    if content is None or len(content) != size or not content.startswith(PNG_SIGNATURE):
        return None  # not what it claims to be: never shown to a client as an image
    sha = hashlib.sha256(content).hexdigest()
    if raw_sha != b"-" and raw_sha.decode("ascii", "replace") != sha:
        return None
    reason: OmittedReason | None = None
    if size > limits.output_file_bytes:
        reason = "too_large"
    elif returned >= limits.figures:
        reason = "over_count"
    return _returned(path, size, sha, reason, content, mime="image/png")


def _files_end(value: bytes) -> tuple[int, int, bool] | None:
    fields = value.split(b" ")
    if len(fields) != 3 or fields[2] not in {b"0", b"1"}:  # noqa: PLR2004 - listed, unlisted, complete
        return None
    listed, unlisted = _size(fields[0]), _size(fields[1])
    return None if listed is None or unlisted is None else (listed, unlisted, fields[2] == b"1")


def _b64(raw: bytes | memoryview) -> bytes | None:
    """Strict standard base64 (the C decoder's strict mode: base64.b64decode's validation is a
    regular expression, ten times slower on megabytes), or None."""
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _fields(value: bytes, count: int) -> tuple[list[bytes], memoryview] | None:
    """``value`` split at its first ``count - 1`` spaces: those fields, and the last as a view (it
    is content, megabytes: no copy); None when it has fewer fields or a space in the last one."""
    fields: list[bytes] = []
    start = 0
    for _ in range(count - 1):
        space = value.find(b" ", start)
        if space < 0:
            return None
        fields.append(value[start:space])
        start = space + 1
    if value.find(b" ", start) >= 0:
        return None
    return fields, memoryview(value)[start:]


def _size(raw: bytes) -> int | None:
    if not raw.isdigit() or len(raw) > 19:  # noqa: PLR2004 - an int64
        return None
    return int(raw)


def _text(content: bytes) -> str | None:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- media types ---------------------------------------------------------------------------------

# The standard library's own table, without the host's /etc/mime.types: the same answer everywhere.
_TYPES = mimetypes.MimeTypes()
for _type, _extension in (
    ("text/markdown", ".md"),
    ("text/x-python", ".py"),
    ("application/json", ".json"),
    ("application/x-ndjson", ".jsonl"),
    ("text/javascript", ".js"),
    ("text/x-shellscript", ".sh"),
    ("application/toml", ".toml"),
    ("application/yaml", ".yaml"),
    ("application/yaml", ".yml"),
    ("image/webp", ".webp"),
):
    _TYPES.add_type(_type, _extension)

# Content that says what it is, whatever the name says.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (PNG_SIGNATURE, "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def _sniff(content: bytes) -> str | None:
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if content.startswith(magic)), None)


def _mime(path: str, content: bytes | None, *, is_text: bool | None = None) -> str:
    """The media type from the content's signature when it has one, else from the name, else from
    whether the content is text (``is_text``, when the caller decoded it already). A name never
    makes content an image: only its bytes do."""
    by_name = _TYPES.guess_type(path, strict=False)[0]
    if content is None:
        return by_name or "application/octet-stream"
    sniffed = _sniff(content)
    if sniffed is not None:
        return sniffed
    if by_name is not None and by_name not in IMAGE_TYPES and by_name != "application/pdf":
        return by_name
    if is_text is None:
        is_text = _text(content) is not None
    return "text/plain" if is_text else "application/octet-stream"


# -- the init's rules, in Python (the fake backend and the tests) ---------------------------------


def guard_trailers(
    guard_nonce: str,
    left: Mapping[str, bytes | None],
    before: Mapping[str, bytes | None],
    limits: Limits,
) -> list[bytes]:
    """The trailers the sandbox's init writes for a working directory holding ``left`` (path to
    content; None for a link, fifo or device) that held ``before`` (the uploads, or what a session's
    previous call left): see seccomp_guard.c."""
    budget = _Budget(limits.output_files, limits.output_file_bytes, limits.output_files_bytes)
    out: list[bytes] = []
    listed = unlisted = 0
    for path in sorted(left, key=lambda p: p.encode("utf-8")):
        content = left[path]
        if path in before and before[path] == content:
            continue
        if listed >= MAX_LISTED:
            unlisted += 1
            continue
        listed += 1
        name = base64.b64encode(path.encode("utf-8"))
        if content is None:
            fields = [name, b"0", b"-", b"not_regular", b"-"]
        else:
            sha = hashlib.sha256(content).hexdigest().encode("ascii")
            reason = budget.admit(len(content))
            body = b"-" if reason else base64.b64encode(content)
            fields = [name, b"%d" % len(content), sha, (reason or "-").encode("ascii"), body]
        out.append(protocol.trailer(guard_nonce, protocol.FILE, b" ".join(fields)))
    end = b"%d %d 1" % (listed, unlisted)
    out.append(protocol.trailer(guard_nonce, protocol.FILES_END, end))  # on stdout; the fake adds stderr's
    return out


def figure_trailer(nonce: str, png: bytes) -> bytes:
    """The trailer the Python runner writes for one figure it returns."""
    value = b"%d %s - %s" % (len(png), hashlib.sha256(png).hexdigest().encode("ascii"), base64.b64encode(png))
    return protocol.trailer(nonce, protocol.FIGURE, value)

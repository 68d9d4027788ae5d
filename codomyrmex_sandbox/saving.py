"""Saving what came back (`ExecutionResult.files` and ``.figures``) into a local directory, safely.

The names come from the sandbox, so they are untrusted: a name is written only if it obeys the
upload rules (`workspace.path_problem`: relative, no ``..``, no backslash or control character),
and the directories on the way are opened one component at a time without following links, so
that nothing already in the directory (a link to ``/etc``) can lead a write outside it. An
existing regular file is replaced; a link in a file's place is refused, never followed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from codomyrmex_sandbox.models import ExecutionResult, ReturnedFile
from codomyrmex_sandbox.workspace import path_problem

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def save_returned(result: ExecutionResult, directory: Path) -> list[str]:
    """Write every returned file and figure with content under ``directory``; one line per entry
    saying where it went or why it was not written."""
    directory.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()  # a figure never replaces a returned file of the same name
    return [_save(entry, directory, taken) for entry in (*result.files, *result.figures)]


def _save(entry: ReturnedFile, directory: Path, taken: set[str]) -> str:
    if entry.content is None:
        return f"not saved: {entry.path!r} (its content did not come back: {entry.omitted})"
    problem = path_problem(entry.path)
    if problem is not None:
        return f"not saved: {entry.path!r} (the name is refused: {problem})"
    if entry.path in taken:
        return f"not saved: {entry.path!r} (a returned file of the same name was saved)"
    try:
        _write_below(directory, entry.path, entry.content)
    except OSError as exc:
        return f"not saved: {entry.path!r} ({exc.strerror or exc}; a link or a non-directory is in the way?)"
    taken.add(entry.path)
    return f"saved {directory / entry.path} ({entry.size_bytes} bytes)"


def _write_below(directory: Path, path: str, content: bytes) -> None:
    *parents, name = path.split("/")
    current = os.open(directory, _DIRECTORY)
    try:
        for part in parents:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=current)
            following = os.open(part, _DIRECTORY, dir_fd=current)
            os.close(current)
            current = following
        fd = os.open(name, _FILE, 0o644, dir_fd=current)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
    finally:
        os.close(current)

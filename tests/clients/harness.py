"""What the client-library tests share: the README's snippets, and servers whose end is recorded.

- `snippet` reads the code block that README.md's "Client libraries" section shows for a library, and
  `load_snippet` writes it out with its placeholder path replaced (by a `Servers` launcher), so that
  the tests run exactly the code a user copies: when the README changes, the tests run the new code.
- `Servers` is a launcher that client libraries start in place of the console script: it starts the
  real server through tests/clients/server_wrapper.py, which records the server's pid and how it ended
  (by itself, or by the client's SIGTERM or SIGKILL), with the environment the tests' servers need.
- `CLIENTS_PYTHON` is the interpreter of ``.venv-clients``, the virtualenv of the libraries that still
  pin mcp<2 (langchain-mcp-adapters); `clients_python` fails with the command that makes it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import console_script, process_alive, server_environment

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## Client libraries"
PLACEHOLDER = "/path/to/codomyrmex-sandbox/.venv/bin/codomyrmex-sandbox"
WRAPPER = Path(__file__).resolve().parent / "server_wrapper.py"
CLIENTS_VENV = ROOT / ".venv-clients"
CLIENTS_PYTHON = CLIENTS_VENV / "bin" / "python"
CLIENTS_REQUIREMENTS = Path(__file__).resolve().parent / "requirements-mcp1.txt"
FIX_CLIENTS_VENV = (
    "run `./scripts/setup`, or `python3 -m venv .venv-clients && "
    ".venv-clients/bin/python -m pip install -r tests/clients/requirements-mcp1.txt`"
)

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def snippet(library: str) -> str:
    """The first python block under ``### <library>`` in README.md's "Client libraries" section."""
    text = README.read_text(encoding="utf-8")
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"README.md has no {SECTION!r} section"
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start : end if end >= 0 else len(text)]
    parts = re.split(r"\n### ", section)
    found = [part for part in parts[1:] if part.split(maxsplit=1)[0] == library]
    assert len(found) == 1, f"README.md's {SECTION!r} should have one '### {library}' subsection, has {len(found)}"
    block = _BLOCK.search(found[0])
    assert block is not None, f"README.md's '### {library}' subsection has no python code block"
    return block.group(1)


def load_snippet(library: str, command: str, directory: Path) -> Path:
    """README's snippet for ``library``, with its server command replaced by ``command``, as a file."""
    code = snippet(library)
    assert code.count(PLACEHOLDER) == 1, f"the {library} snippet should name {PLACEHOLDER} once"
    path = directory / f"readme_{re.sub(r'[^a-z0-9]', '_', library)}.py"
    path.write_text(code.replace(PLACEHOLDER, command), encoding="utf-8")
    return path


def clients_python() -> str:
    """``.venv-clients``'s interpreter: the tests of mcp 1.x libraries fail (never skip) without it."""
    if not CLIENTS_PYTHON.exists():
        pytest.fail(f"{CLIENTS_PYTHON} is missing; {FIX_CLIENTS_VENV}.", pytrace=False)
    return str(CLIENTS_PYTHON)


@dataclass
class ServerRecord:
    """How one server started by a client library ended (see tests/clients/server_wrapper.py)."""

    wrapper_pid: int
    server_pid: int
    signals: list[str]
    status: int | None
    lived_seconds: float | None
    after_signal_seconds: float | None  # from the client's first signal to the server's exit

    def problem(self) -> str | None:
        """Why this is not a server that exited by itself with status 0, if it is not."""
        if self.status is None:
            return (
                f"server {self.server_pid} never exited by itself: killed with its wrapper (SIGKILL), or still running"
            )
        if self.signals:
            after = "" if self.after_signal_seconds is None else f"; it exited {self.after_signal_seconds:.2f} s later"
            return (
                f"the client sent server {self.server_pid} {', '.join(self.signals)} (it did not exit in time by "
                f"itself, {self.lived_seconds:.1f} s after it started){after}"
            )
        if self.status != 0:
            return f"server {self.server_pid} exited with status {self.status}"
        return None


@dataclass
class Servers:
    """A launcher, ``command``, that client libraries start in place of the console script."""

    directory: Path
    command: str = ""
    records_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.records_dir = self.directory / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        launcher = self.directory / "codomyrmex-sandbox"
        exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in server_environment().items())
        command = shlex.join([sys.executable, str(WRAPPER), str(self.records_dir), console_script()])
        launcher.write_text(f'#!/bin/sh\nexport {exports}\nexec {command} "$@"\n', encoding="utf-8")
        launcher.chmod(0o755)
        self.command = str(launcher)

    def records(self) -> list[ServerRecord]:
        found = []
        for path in sorted(self.records_dir.glob("*.json")):
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            ended = data.get("ended")
            found.append(
                ServerRecord(
                    wrapper_pid=int(path.stem),
                    server_pid=int(data["server_pid"]),
                    signals=list(data["signals"]),
                    status=data["status"],
                    lived_seconds=None if ended is None else ended - data["started"],
                    after_signal_seconds=(
                        None if ended is None or "first_signal" not in data else ended - data["first_signal"]
                    ),
                )
            )
        return found

    def pids(self) -> set[int]:
        return {record.server_pid for record in self.records()}

    def wait_until_all_ended(self, within: float = 10.0) -> list[ServerRecord]:
        """The records, once every server has ended (or ``within`` seconds have passed)."""
        deadline = time.monotonic() + within
        while True:
            records = self.records()
            if all(r.status is not None or not process_alive(r.wrapper_pid) for r in records):
                return records
            if time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def problems(self) -> list[str]:
        """Every server started so far that did not exit by itself with status 0, and why."""
        return [p for r in self.wait_until_all_ended() if (p := r.problem()) is not None]

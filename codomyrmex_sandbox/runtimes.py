"""Runtimes are data: one folder each under ``runtimes/`` with an image recipe and a descriptor.

A descriptor (``runtime.toml``) says how to run code in the image and how to ask its version::

    name = "python"
    command = ["python3", "-I", "/opt/codomyrmex/runner.py"]
    version_command = ["python3", "-c", "import platform; print('python', platform.python_version())"]

``runtimes/_shared/`` holds what every image builds in (the seccomp guard); it has no
descriptor, so it is not a runtime. Images are built with ``runtimes/`` as the context.

The image tag carries a hash of the folder's files and of ``_shared``'s, so an edited recipe makes
a stale image visible (``doctor`` says so, and ``runtimes build`` rebuilds it). Adding a language
means adding a folder; no code here changes.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from codomyrmex_sandbox.errors import ConfigurationError

LABEL_PREFIX = "io.codomyrmex.sandbox"
VERSION_LABEL = f"{LABEL_PREFIX}.runtime-version"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SHARED = "_shared"  # files that every runtime image builds in; part of every image's digest


@dataclass(frozen=True)
class RuntimeSpec:
    """One language runtime: where its recipe lives and how to run code in its image."""

    name: str
    directory: Path
    command: tuple[str, ...]
    version_command: tuple[str, ...]
    digest: str

    def image(self, prefix: str) -> str:
        """The image reference this recipe builds, e.g. ``codomyrmex-sandbox-python:3f2a...``."""
        return f"{prefix}-{self.name}:{self.digest}"


def default_runtimes_dir() -> Path:
    """The recipes shipped with the package (a wheel), else the source checkout's ``runtimes/``."""
    shipped = Path(str(resources.files("codomyrmex_sandbox"))) / "_runtimes"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "runtimes"


def load_runtimes(directory: Path | None = None, enabled: list[str] | None = None) -> dict[str, RuntimeSpec]:
    """Read every runtime descriptor in ``directory``; keep the ``enabled`` ones when given."""
    root = directory or default_runtimes_dir()
    if not root.is_dir():
        raise ConfigurationError(f"runtimes folder {root} does not exist; set runtimes_dir to the recipes.")
    found: dict[str, RuntimeSpec] = {}
    for descriptor in sorted(root.glob("*/runtime.toml")):
        spec = _load_one(descriptor)
        found[spec.name] = spec
    if enabled is not None:
        missing = sorted(set(enabled) - found.keys())
        if missing:
            raise ConfigurationError(
                f"languages {missing} are enabled in the settings but have no recipe in {root}; known: {sorted(found)}."
            )
        found = {name: spec for name, spec in found.items() if name in enabled}
    if not found:
        raise ConfigurationError(f"no runtime is enabled (looked in {root}).")
    return found


def _load_one(descriptor: Path) -> RuntimeSpec:
    try:
        data = tomllib.loads(descriptor.read_text(encoding="utf-8"))
        name = data["name"]
        command = tuple(data["command"])
        version_command = tuple(data["version_command"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"runtime descriptor {descriptor} is invalid: {exc!r}") from exc
    if not isinstance(name, str) or not _NAME.match(name) or name != descriptor.parent.name:
        raise ConfigurationError(f"runtime descriptor {descriptor}: name must match its folder name.")
    if not command or not all(isinstance(part, str) for part in command + version_command):
        raise ConfigurationError(f"runtime descriptor {descriptor}: command must be a list of strings.")
    return RuntimeSpec(
        name=name,
        directory=descriptor.parent,
        command=command,
        version_command=version_command,
        digest=_digest(descriptor.parent, descriptor.parent.parent / SHARED),
    )


def _digest(*directories: Path) -> str:
    """A short hash of the recipe's folders: file names and contents, in a stable order."""
    digest = hashlib.sha256()
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            # Named from the runtimes root ("python/runner.py", "_shared/..."), so no two collide.
            digest.update(path.relative_to(directory.parent).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]

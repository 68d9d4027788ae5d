"""Resource accounting from the kernel's cgroups, on cgroup v1 and v2.

The engine removes a container's cgroup the moment the container exits, taking its counters with
it, and its stats API only samples once a second. So each sandbox is created under a parent
cgroup of its own (``cgroup_parent``); the parent's counters are hierarchical and outlive the
container: peak memory, CPU time and out-of-memory kills can be read after the exit, exactly.
The parent is removed afterwards.

This reads the host's cgroup filesystem, so it works where the engine runs on the same host as the
server; elsewhere (a remote engine) usage is reported as unknown (null), never guessed. These are
kernel files the engine manages, never paths inside a sandbox. Each cgroup version has a class of
its own (`CgroupV1`, `CgroupV2`); `accounting_for` picks the one the engine uses.
"""

from __future__ import annotations

import contextlib
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codomyrmex_sandbox.models import ResourceUsage

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "codomyrmex-sandbox"
DRIVERS = ("cgroupfs", "systemd")


@dataclass(frozen=True)
class CgroupAccounting(ABC):
    """Where sandboxes' parent cgroups live and how to read them, for one engine's setup."""

    driver: str  # "cgroupfs" or "systemd"
    root: Path = CGROUP_ROOT

    def parent_for(self, execution_id: str) -> str:
        """The ``cgroup_parent`` value to give the engine for this execution."""
        if self.driver == "systemd":
            # systemd reads '-' as nesting: this is codomyrmex.slice/codomyrmex-<id>.slice.
            return f"codomyrmex-{execution_id}.slice"
        return f"/{PARENT_NAME}/{execution_id}"

    def _relative(self, parent: str) -> Path:
        """The parent's path below a hierarchy's root."""
        return Path("codomyrmex.slice") / parent if self.driver == "systemd" else Path(parent.lstrip("/"))

    def read(self, parent: str) -> ResourceUsage | None:
        """Peak memory, CPU time and OOM kills under ``parent``; None when they cannot be read."""
        try:
            return self._read(self._relative(parent))
        except (OSError, ValueError, KeyError):
            return None

    def oom_kills(self, parent: str, container_id: str) -> int | None:
        """OOM kills so far in one container under ``parent``, while it still exists; None if unreadable."""
        try:
            return self._oom_kills(self._relative(parent), container_id)
        except (OSError, ValueError, KeyError):
            return None

    def remove(self, parent: str) -> None:
        """Remove the parent's (now empty) directories in every controller."""
        if self.driver == "systemd":
            return  # systemd owns and collects the transient slice
        for directory in self._hierarchies(parent.lstrip("/")):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def sweep(self) -> int:
        """Remove empty per-execution parents that a dead server left; returns how many."""
        if self.driver == "systemd":
            return 0
        removed = 0
        for top in self._hierarchies(PARENT_NAME):
            for child in top.glob("*"):
                if child.is_dir():
                    try:
                        child.rmdir()
                        removed += 1
                    except OSError:
                        continue  # still in use by a live sandbox
        return removed

    @abstractmethod
    def _read(self, relative: Path) -> ResourceUsage: ...

    @abstractmethod
    def _oom_kills(self, relative: Path, container_id: str) -> int: ...

    @abstractmethod
    def _hierarchies(self, relative: str) -> list[Path]:
        """The directories at ``relative`` in every hierarchy of this version (they may not exist)."""


@dataclass(frozen=True)
class CgroupV1(CgroupAccounting):
    """A hierarchy per controller: the memory counters in one, the CPU time in another."""

    def _read(self, relative: Path) -> ResourceUsage:
        memory = self.root / "memory" / relative
        peak = int(_read(memory / "memory.max_usage_in_bytes"))
        failures = int(_read(memory / "memory.failcnt"))
        oom_kills = _keyed(_read(memory / "memory.oom_control")).get("oom_kill", 0)
        cpu_ns = int(_read(self.root / "cpuacct" / relative / "cpuacct.usage"))
        return ResourceUsage(
            cpu_time_ms=round(cpu_ns / 1e6, 3),
            peak_memory_bytes=peak,
            memory_limit_hit=failures > 0 or oom_kills > 0,
            oom_kills=oom_kills,
        )

    def _oom_kills(self, relative: Path, container_id: str) -> int:
        # The count lives in the container's own memory cgroup (where its limit is), which the
        # engine names by its id; it goes when the container exits.
        leaf = f"docker-{container_id}.scope" if self.driver == "systemd" else container_id
        return _keyed(_read(self.root / "memory" / relative / leaf / "memory.oom_control")).get("oom_kill", 0)

    def _hierarchies(self, relative: str) -> list[Path]:
        return list(self.root.glob(f"*/{relative}"))


@dataclass(frozen=True)
class CgroupV2(CgroupAccounting):
    """One unified hierarchy, whose counters (``memory.events`` too) are hierarchical."""

    def _read(self, relative: Path) -> ResourceUsage:
        unified = self.root / relative
        events = _keyed(_read(unified / "memory.events"))
        cpu_us = _keyed(_read(unified / "cpu.stat"))["usage_usec"]
        peak_file = unified / "memory.peak"  # kernels 5.19 and later
        peak = int(_read(peak_file)) if peak_file.exists() else None
        oom_kills = events.get("oom_kill", 0)
        return ResourceUsage(
            cpu_time_ms=round(cpu_us / 1e3, 3),
            peak_memory_bytes=peak,
            memory_limit_hit=events.get("max", 0) > 0 or oom_kills > 0,
            oom_kills=oom_kills,
        )

    def _oom_kills(self, relative: Path, container_id: str) -> int:  # noqa: ARG002 - the parent's count covers it
        return _keyed(_read(self.root / relative / "memory.events")).get("oom_kill", 0)

    def _hierarchies(self, relative: str) -> list[Path]:
        return [self.root / relative]


def accounting_for(info: Mapping[str, Any], root: Path = CGROUP_ROOT) -> CgroupAccounting | None:
    """Cgroup accounting when the engine (``info`` is its answer) runs on this host with a layout we know."""
    version = str(info.get("CgroupVersion", "1"))
    driver = str(info.get("CgroupDriver", "cgroupfs"))
    if driver not in DRIVERS or not root.is_dir():
        return None
    # A remote engine has its own cgroups; ours would not show its sandboxes.
    if info.get("Name") != socket.gethostname() and not Path("/var/run/docker.sock").exists():
        return None
    versions: dict[str, type[CgroupAccounting]] = {"1": CgroupV1, "2": CgroupV2}
    kind = versions.get(version)
    return None if kind is None else kind(driver=driver, root=root)


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii").strip()


def _keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.events, cpu.stat, memory.oom_control) as a dict."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values

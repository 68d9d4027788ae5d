"""Resource accounting from the kernel's cgroups, on cgroup v1 and v2.

The engine removes a container's cgroup the moment the container exits, taking its counters with
it, and its stats API only samples once a second. So each sandbox is created under a parent
cgroup of its own (``cgroup_parent``); the parent's counters are hierarchical and outlive the
container: peak memory, CPU time and out-of-memory kills can be read after the exit, exactly.
The parent is removed afterwards.

This reads the host's cgroup filesystem, so it works where the engine runs on the same host as the
server; elsewhere (a remote engine) usage is reported as unknown (null), never guessed. These are
kernel files the engine manages, never paths inside a sandbox.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from codomyrmex_sandbox.models import ResourceUsage

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "codomyrmex-sandbox"


@dataclass(frozen=True)
class CgroupAccounting:
    """Where sandboxes' parent cgroups live and how to read them, for one engine's setup."""

    version: int  # 1 or 2
    driver: str  # "cgroupfs" or "systemd"
    root: Path = CGROUP_ROOT

    def parent_for(self, execution_id: str) -> str:
        """The ``cgroup_parent`` value to give the engine for this execution."""
        if self.driver == "systemd":
            # systemd reads '-' as nesting: this is codomyrmex.slice/codomyrmex-<id>.slice.
            return f"codomyrmex-{execution_id}.slice"
        return f"/{PARENT_NAME}/{execution_id}"

    def _directories(self, parent: str) -> dict[str, Path]:
        """The parent's directory per controller (v1) or in the unified tree (v2)."""
        systemd = self.driver == "systemd"
        relative = Path("codomyrmex.slice") / parent if systemd else Path(parent.lstrip("/"))
        if self.version == 2:  # noqa: PLR2004
            return {"unified": self.root / relative}
        return {name: self.root / name / relative for name in ("memory", "cpuacct")}

    def read(self, parent: str) -> ResourceUsage | None:
        """Peak memory, CPU time and OOM kills under ``parent``; None when they cannot be read."""
        try:
            if self.version == 2:  # noqa: PLR2004
                return self._read_v2(self._directories(parent)["unified"])
            dirs = self._directories(parent)
            return self._read_v1(dirs["memory"], dirs["cpuacct"])
        except (OSError, ValueError, KeyError):
            return None

    def _read_v1(self, memory: Path, cpuacct: Path) -> ResourceUsage:
        peak = int(_read(memory / "memory.max_usage_in_bytes"))
        failures = int(_read(memory / "memory.failcnt"))
        oom_kills = _keyed(_read(memory / "memory.oom_control")).get("oom_kill", 0)
        cpu_ns = int(_read(cpuacct / "cpuacct.usage"))
        return ResourceUsage(
            cpu_time_ms=round(cpu_ns / 1e6, 3),
            peak_memory_bytes=peak,
            memory_limit_hit=failures > 0 or oom_kills > 0,
            oom_kills=oom_kills,
        )

    def _read_v2(self, unified: Path) -> ResourceUsage:
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

    def oom_kills(self, parent: str, container_id: str) -> int | None:
        """OOM kills so far in one container under ``parent``, while it still exists; None if unreadable.

        On v2 the parent's ``memory.events`` is hierarchical; on v1 the count lives in the
        container's own memory cgroup (where its limit is), which the engine names by its id.
        """
        try:
            if self.version == 2:  # noqa: PLR2004
                return _keyed(_read(self._directories(parent)["unified"] / "memory.events")).get("oom_kill", 0)
            leaf = f"docker-{container_id}.scope" if self.driver == "systemd" else container_id
            control = self._directories(parent)["memory"] / leaf / "memory.oom_control"
            return _keyed(_read(control)).get("oom_kill", 0)
        except (OSError, ValueError, KeyError):
            return None

    def remove(self, parent: str) -> None:
        """Remove the parent's (now empty) directories in every controller."""
        if self.driver == "systemd":
            return  # systemd owns and collects the transient slice
        relative = parent.lstrip("/")
        candidates = [self.root / relative] if self.version == 2 else list(self.root.glob(f"*/{relative}"))  # noqa: PLR2004
        for directory in candidates:
            with contextlib.suppress(OSError):
                directory.rmdir()

    def sweep(self) -> int:
        """Remove empty per-execution parents that a dead server left; returns how many."""
        if self.driver == "systemd":
            return 0
        tops = [self.root / PARENT_NAME] if self.version == 2 else list(self.root.glob(f"*/{PARENT_NAME}"))  # noqa: PLR2004
        removed = 0
        for top in tops:
            for child in top.glob("*"):
                if child.is_dir():
                    try:
                        child.rmdir()
                        removed += 1
                    except OSError:
                        continue  # still in use by a live sandbox
        return removed


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

"""How a sandbox ended, from everything the host saw: the engine's record and the kernel's counters.

The engine removes a stopped container at once (auto-remove), and with it its OOM flag (and, on
cgroup v1, its own OOM count). What is left is the accounting cgroup's counters, read after the
exit. These pure functions fold them into the evidence that `decide` turns into a status.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from codomyrmex_sandbox.backends.base import Evidence
from codomyrmex_sandbox.models import ResourceUsage

SIGKILL_EXIT = 128 + 9  # how the init reports a child killed by SIGKILL
KERNEL_OVERHEAD_BYTES = 256 * 1024  # what the kernel charges a cgroup beyond what its processes use


def with_usage(
    evidence: Evidence, usage: ResourceUsage | None, reported_exit: int | None, limit_bytes: int
) -> tuple[Evidence, ResourceUsage | None]:
    """The evidence and usage once the kernel's counters (``usage``, None when unreadable) are heard."""
    if usage is None:
        return evidence, None
    if usage.oom_kills and not evidence.oom_killed:
        evidence = dataclasses.replace(evidence, oom_killed=True)  # the kernel's count is evidence too
    usage = with_limit_hit(usage, evidence, limit_bytes)
    if usage.memory_limit_hit and not evidence.oom_killed and unordered_sigkill(evidence, reported_exit):
        # The engine removes a stopped container at once, and with it its OOM flag (and, on
        # cgroup v1, its own OOM count): a SIGKILL that the host did not send, with memory at
        # the limit, is the kernel's OOM killer.
        evidence = dataclasses.replace(evidence, oom_killed=True)
        usage = with_limit_hit(usage, evidence, limit_bytes)
    return evidence, usage


def with_limit_hit(usage: ResourceUsage, evidence: Evidence, limit_bytes: int) -> ResourceUsage:
    """The limit sits on the container's own cgroup, so the parent's failure counter misses it:
    a peak at the limit (within the kernel's per-cgroup overhead) or an OOM kill also means it was hit."""
    at_limit = usage.peak_memory_bytes is not None and usage.peak_memory_bytes + KERNEL_OVERHEAD_BYTES >= limit_bytes
    update: dict[str, Any] = {}
    if not usage.memory_limit_hit and (at_limit or evidence.oom_killed):
        update["memory_limit_hit"] = True
    if evidence.oom_killed and usage.oom_kills == 0:
        # On cgroup v1 the count lives in the container's own cgroup, gone once it exited: the
        # engine's OOM record proves at least one kill.
        update["oom_kills"] = 1
    return usage.model_copy(update=update) if update else usage


def unordered_sigkill(evidence: Evidence, reported_exit: int | None) -> bool:
    """The program's process died of SIGKILL that no kill of the host explains."""
    host_kill = evidence.timed_out or evidence.output_capped or evidence.cancelled
    return not host_kill and evidence.exit_code == SIGKILL_EXIT and reported_exit is None

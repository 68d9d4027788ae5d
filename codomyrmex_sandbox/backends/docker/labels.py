"""The labels every sandbox container carries, and the sweep that removes the ones left behind.

The labels say whose a container is and until when it may live: the server instance, host and
process that started it, and the time past which it is an orphan whatever its owner's state. A
restarted or reconnecting server, and every server's reaper, remove with the same rules the
project's containers whose deadline passed, or whose server on this host is gone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codomyrmex_sandbox.runtimes import LABEL_PREFIX

if TYPE_CHECKING:
    from codomyrmex_sandbox.backends.docker.engine import Engine

MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_EXECUTION = f"{LABEL_PREFIX}.execution-id"
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"
LABEL_CREATED = f"{LABEL_PREFIX}.created-at"
LABEL_EXPIRES = f"{LABEL_PREFIX}.expires-at"
LABEL_HOST = f"{LABEL_PREFIX}.owner-host"
LABEL_PID = f"{LABEL_PREFIX}.owner-pid"
LABEL_UID = f"{LABEL_PREFIX}.uid"
POOL_EXECUTION = "pool"  # the execution label of a warm pool member, not yet handed out
SESSION_EXECUTION = "session"  # the execution label of a session's sandbox started for it


@dataclass(frozen=True)
class Owner:
    """The server that starts sandboxes: its instance id, host name and process id."""

    instance: str
    host: str
    pid: int


def sandbox_labels(execution: str, owner: Owner, *, now: float, expires: float) -> dict[str, str]:
    """The labels of a sandbox started at ``now`` that is an orphan from ``expires`` on (epoch seconds)."""
    return {
        MANAGED: "true",
        LABEL_EXECUTION: execution,
        LABEL_INSTANCE: owner.instance,
        LABEL_CREATED: f"{now:.3f}",
        LABEL_EXPIRES: f"{expires:.3f}",
        LABEL_HOST: owner.host,
        LABEL_PID: str(owner.pid),
    }


def is_orphan(labels: dict[str, str], host: str, now: float) -> bool:
    """Past its deadline (or without a readable one), or owned by a process of this host that is gone."""
    try:
        if float(labels.get(LABEL_EXPIRES, "0")) < now:
            return True
    except ValueError:
        return True
    if labels.get(LABEL_HOST) != host:
        return False
    try:
        os.kill(int(labels.get(LABEL_PID, "0")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def sweep_orphans(engine: Engine, host: str) -> int:
    """Blocking: remove project containers that `is_orphan` says were left behind; returns how many."""
    removed = 0
    for cid, labels in engine.containers(f"{MANAGED}=true"):
        if is_orphan(labels, host, time.time()) and engine.remove(cid):
            removed += 1
    return removed

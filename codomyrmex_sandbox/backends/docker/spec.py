"""The container a sandbox is: every hardening option, as plain data, from the limits and the settings.

`container_spec` is a pure function: the same inputs give the same container, so every option is
tested without an engine (tests/unit/test_docker_spec.py). `host_config` is in the engine's own
shape (the API's ``HostConfig``), exactly what is sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from codomyrmex_sandbox.backends.docker.identity import container_name
from codomyrmex_sandbox.backends.docker.labels import LABEL_UID
from codomyrmex_sandbox.models import MIB, Limits
from codomyrmex_sandbox.runtimes import RuntimeSpec
from codomyrmex_sandbox.settings import Settings

WORKDIR = "/sandbox"
# Every sandbox starts through this program (runtimes/_shared/seccomp_guard.c): it installs the
# project's seccomp filter, stacked on the engine's default profile, and is the sandbox's init
# (PID 1): it runs the command as its child and ends the whole sandbox at the deadline, which no
# process of the sandbox can stop (see SECURITY.md, "In-container self-destruct"). With --lease it
# keeps the container's stdin for itself: the runner's input arrives framed on it (`attach`), and
# the stream's end, however it comes (this server killed outright too), ends the whole sandbox.
SECCOMP_GUARD = "/opt/codomyrmex/seccomp-guard"
OOM_SCORE_ADJ = 500  # the kernel's OOM killer picks a sandbox before the host's own processes


@dataclass(frozen=True)
class ContainerSpec:
    """The arguments of the engine's create call for one sandbox."""

    image: str
    command: tuple[str, ...]
    user: str
    name: str
    labels: Mapping[str, str]
    network_disabled: bool
    host_config: Mapping[str, Any]
    stdin_open: bool = True  # code and stdin travel on the container's stdin
    tty: bool = False
    environment: Mapping[str, str] = field(default_factory=dict)  # none: nothing of the host's
    working_dir: str = WORKDIR
    hostname: str = "sandbox"


def self_destruct_seconds(lifetime: float, settings: Settings) -> int:
    """When the sandbox ends itself: shortly after its deadline, in case this server dies."""
    return math.ceil(lifetime + settings.kill_grace_seconds)


def container_spec(
    runtime: RuntimeSpec,
    limits: Limits,
    *,
    uid: int,
    lifetime: float,
    labels: Mapping[str, str],
    settings: Settings,
    egress_network: str | None = None,
    cgroup_parent: str | None = None,
) -> ContainerSpec:
    """The sandbox that runs as ``uid`` with ``limits`` and ends itself ``lifetime`` (plus the grace) after its start.

    ``egress_network`` is the egress network's name when the sandbox joins it (its firewall rules
    are in place), else None: no network at all. ``cgroup_parent`` is its accounting cgroup.
    """
    scratch = f"rw,nosuid,nodev,size={limits.scratch_mb}m"
    memory = limits.memory_mb * MIB
    host_config: dict[str, Any] = {
        "NetworkMode": egress_network or "none",
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges:true"],
        "ReadonlyRootfs": True,
        "ShmSize": limits.scratch_mb * MIB,
        "Memory": memory,
        "MemorySwap": memory,  # equal: no swap
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": limits.pids,
        "Ulimits": [
            {"Name": "nofile", "Soft": limits.open_files, "Hard": limits.open_files},
            {"Name": "fsize", "Soft": limits.file_size_mb * MIB, "Hard": limits.file_size_mb * MIB},
            {"Name": "core", "Soft": 0, "Hard": 0},
        ],
        # The guard is the init, not the engine's: an init of the engine's runs as the sandbox
        # user too, and nothing would then enforce the deadline that the program cannot stop.
        "Init": False,
        # The engine removes the container once it stops, even when no server is left to do it.
        "AutoRemove": True,
        "IpcMode": "private",
        # The sandbox sees its own cgroup as the root: no host cgroup path (on cgroup v1 the
        # engine's default is the host's namespace, which shows it).
        "CgroupnsMode": "private",
        "LogConfig": {"Type": "none", "Config": {}},
        "OomScoreAdj": OOM_SCORE_ADJ,
        # A uid of its own (see identity.py): the tmpfs it works in belongs to that uid alone.
        "Tmpfs": {
            "/tmp": f"{scratch},mode=1777",  # noqa: S108 - inside the sandbox
            WORKDIR: f"{scratch},uid={uid},gid={uid},mode=0700",
        },
    }
    if egress_network is not None:
        host_config["Sysctls"] = {"net.ipv6.conf.all.disable_ipv6": "1"}
    if settings.oci_runtime is not None:
        host_config["Runtime"] = settings.oci_runtime
    if cgroup_parent is not None:
        host_config["CgroupParent"] = cgroup_parent
    return ContainerSpec(
        image=runtime.image(settings.image_prefix),
        command=(
            SECCOMP_GUARD,
            "--deadline",
            str(self_destruct_seconds(lifetime, settings)),
            "--lease",
            *runtime.command,
        ),
        user=f"{uid}:{uid}",
        name=container_name(uid),
        labels={**labels, LABEL_UID: str(uid)},
        network_disabled=egress_network is None,
        host_config=host_config,
    )

"""Every hardening option of a sandbox container, checked on the spec itself, without an engine."""

from __future__ import annotations

import pytest

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.backends.docker.labels import LABEL_EXPIRES, LABEL_UID, MANAGED, Owner, sandbox_labels
from codomyrmex_sandbox.backends.docker.spec import SECCOMP_GUARD, WORKDIR, ContainerSpec, container_spec
from codomyrmex_sandbox.models import MIB, Limits
from codomyrmex_sandbox.runtimes import load_runtimes

UID = 1_000_123_456
TMP = "/tmp"  # noqa: S108 - inside the sandbox
LIMITS = Limits(
    timeout_seconds=5,
    memory_mb=256,
    cpus=1.5,
    pids=64,
    open_files=128,
    file_size_mb=16,
    scratch_mb=32,
    output_bytes=1_000_000,
)
OWNER = Owner(instance="0123456789abcdef", host="host-a", pid=4242)


def spec_of(
    limits: Limits = LIMITS, *, egress: str | None = None, parent: str | None = None, **settings: object
) -> ContainerSpec:
    loaded = Settings.load(backend="fake", **settings)
    runtime = load_runtimes(loaded.runtimes_dir)["python"]
    labels = sandbox_labels("exec-1", OWNER, now=1000.0, expires=1065.0)
    return container_spec(
        runtime,
        limits,
        uid=UID,
        lifetime=limits.timeout_seconds,
        labels=labels,
        settings=loaded,
        egress_network=egress,
        cgroup_parent=parent,
    )


def test_every_capability_is_dropped_and_none_can_be_regained():
    host = spec_of().host_config
    assert host["CapDrop"] == ["ALL"]
    assert "CapAdd" not in host
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert "Privileged" not in host


def test_the_root_filesystem_is_read_only():
    assert spec_of().host_config["ReadonlyRootfs"] is True


def test_memory_equals_memory_plus_swap_so_there_is_no_swap():
    host = spec_of().host_config
    assert host["Memory"] == host["MemorySwap"] == 256 * MIB


def test_cpus_and_pids_are_limited():
    host = spec_of().host_config
    assert host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == 64


def test_open_files_file_size_and_core_dumps_are_limited():
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in spec_of().host_config["Ulimits"]}
    assert ulimits == {"nofile": (128, 128), "fsize": (16 * MIB, 16 * MIB), "core": (0, 0)}


def test_the_only_writable_places_are_size_capped_tmpfs_without_setuid_or_devices():
    host = spec_of().host_config
    assert set(host["Tmpfs"]) == {TMP, WORKDIR}
    for options in host["Tmpfs"].values():
        assert options.split(",")[:4] == ["rw", "nosuid", "nodev", "size=32m"]
    assert host["Tmpfs"][TMP].endswith(",mode=1777")
    assert host["ShmSize"] == 32 * MIB


def test_the_working_directory_belongs_to_the_sandboxs_own_uid_alone():
    spec = spec_of()
    assert spec.host_config["Tmpfs"][WORKDIR].endswith(f",uid={UID},gid={UID},mode=0700")
    assert spec.user == f"{UID}:{UID}"
    assert spec.working_dir == WORKDIR


def test_the_name_carries_the_uid_so_the_engine_keeps_uids_unique():
    spec = spec_of()
    assert spec.name == f"codomyrmex-sandbox-u{UID}"
    assert spec.labels[LABEL_UID] == str(UID)


def test_nothing_of_the_host_is_mounted_or_passed_in():
    spec = spec_of()
    for key in ("Binds", "Mounts", "Devices", "VolumesFrom", "PortBindings", "PidMode", "UTSMode", "UsernsMode"):
        assert key not in spec.host_config
    assert dict(spec.environment) == {}
    assert spec.hostname == "sandbox"


def test_no_log_driver_keeps_output_off_the_hosts_disk():
    assert spec_of().host_config["LogConfig"] == {"Type": "none", "Config": {}}


def test_the_guard_is_the_init_and_the_engine_removes_the_container_once_it_stops():
    host = spec_of().host_config
    assert host["Init"] is False
    assert host["AutoRemove"] is True


def test_the_guard_runs_the_runner_with_a_deadline_of_the_lifetime_plus_the_grace_and_the_lease():
    spec = spec_of(kill_grace_seconds=30)
    guard, flag, deadline, lease, *command = spec.command
    assert (guard, flag, deadline, lease) == (SECCOMP_GUARD, "--deadline", "35", "--lease")
    assert command == ["python3", "-I", "/opt/codomyrmex/runner.py"]


def test_the_deadline_is_rounded_up_to_whole_seconds():
    spec = spec_of(LIMITS.model_copy(update={"timeout_seconds": 0.2}), kill_grace_seconds=1)
    assert spec.command[2] == "2"


def test_cgroup_and_ipc_namespaces_are_private():
    host = spec_of().host_config
    assert host["CgroupnsMode"] == "private"
    assert host["IpcMode"] == "private"


def test_the_kernel_kills_a_sandbox_before_the_host_when_memory_runs_out():
    assert spec_of().host_config["OomScoreAdj"] > 0


def test_without_egress_there_is_no_network_at_all():
    spec = spec_of()
    assert spec.network_disabled is True
    assert spec.host_config["NetworkMode"] == "none"
    assert "Sysctls" not in spec.host_config


def test_with_egress_the_sandbox_joins_only_the_egress_network_without_ipv6():
    spec = spec_of(LIMITS.model_copy(update={"network": "egress"}), egress="codomyrmex-egress")
    assert spec.network_disabled is False
    assert spec.host_config["NetworkMode"] == "codomyrmex-egress"
    assert spec.host_config["Sysctls"] == {"net.ipv6.conf.all.disable_ipv6": "1"}


@pytest.mark.parametrize(("oci_runtime", "expected"), [(None, None), ("runsc", "runsc")])
def test_the_operators_oci_runtime_is_used_when_set(oci_runtime, expected):
    assert spec_of(oci_runtime=oci_runtime).host_config.get("Runtime") == expected


def test_the_accounting_cgroup_is_the_parent_when_there_is_one():
    assert "CgroupParent" not in spec_of().host_config
    assert spec_of(parent="/codomyrmex-sandbox/abc").host_config["CgroupParent"] == "/codomyrmex-sandbox/abc"


def test_the_labels_say_whose_the_container_is_and_until_when():
    labels = spec_of().labels
    assert labels[MANAGED] == "true"
    assert labels[LABEL_EXPIRES] == "1065.000"
    assert labels["io.codomyrmex.sandbox.execution-id"] == "exec-1"
    assert labels["io.codomyrmex.sandbox.instance"] == OWNER.instance
    assert labels["io.codomyrmex.sandbox.owner-host"] == "host-a"
    assert labels["io.codomyrmex.sandbox.owner-pid"] == "4242"
    assert labels["io.codomyrmex.sandbox.created-at"] == "1000.000"


def test_the_image_is_the_runtimes_current_one_and_code_arrives_on_stdin():
    spec = spec_of(image_prefix="cdmx")
    assert spec.image.startswith("cdmx-python:")
    assert spec.stdin_open is True
    assert spec.tty is False


def test_the_same_inputs_give_the_same_container():
    assert spec_of() == spec_of()

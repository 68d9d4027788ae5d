"""Resource accounting reads the kernel's counters on cgroup v1 and v2 layouts alike."""

from __future__ import annotations

from pathlib import Path

from codomyrmex_sandbox.backends.docker.cgroups import CgroupV1, CgroupV2


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_counters_are_read_from_the_per_execution_parent(tmp_path):
    accounting = CgroupV1(driver="cgroupfs", root=tmp_path)
    parent = accounting.parent_for("abc")
    assert parent == "/codomyrmex-sandbox/abc"
    memory = tmp_path / "memory/codomyrmex-sandbox/abc"
    write(memory / "memory.max_usage_in_bytes", "67371008\n")
    write(memory / "memory.failcnt", "0\n")
    write(memory / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    write(tmp_path / "cpuacct/codomyrmex-sandbox/abc/cpuacct.usage", "79126000\n")
    usage = accounting.read(parent)
    assert usage is not None
    assert (usage.cpu_time_ms, usage.peak_memory_bytes, usage.oom_kills) == (79.126, 67371008, 2)
    assert usage.memory_limit_hit


def test_cgroup_v2_counters_are_read_from_the_unified_tree(tmp_path):
    accounting = CgroupV2(driver="cgroupfs", root=tmp_path)
    unified = tmp_path / "codomyrmex-sandbox/abc"
    write(unified / "memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    write(unified / "memory.peak", "1048576\n")
    write(unified / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    usage = accounting.read(accounting.parent_for("abc"))
    assert usage is not None
    assert (usage.cpu_time_ms, usage.peak_memory_bytes, usage.memory_limit_hit) == (1.5, 1048576, False)


def test_systemd_parents_are_slices_and_their_counters_are_found(tmp_path):
    accounting = CgroupV2(driver="systemd", root=tmp_path)
    parent = accounting.parent_for("abc")
    assert parent == "codomyrmex-abc.slice"
    unified = tmp_path / "codomyrmex.slice/codomyrmex-abc.slice"
    write(unified / "memory.events", "max 3\noom_kill 0\n")
    write(unified / "cpu.stat", "usage_usec 2000\n")
    usage = accounting.read(parent)
    assert usage is not None
    assert usage.peak_memory_bytes is None  # kernels before 5.19 have no memory.peak
    assert usage.memory_limit_hit


def test_unreadable_counters_give_unknown_usage_not_a_guess(tmp_path):
    accounting = CgroupV1(driver="cgroupfs", root=tmp_path)
    assert accounting.read(accounting.parent_for("missing")) is None


def test_parents_are_removed_after_use_and_swept_when_left_behind(tmp_path):
    accounting = CgroupV1(driver="cgroupfs", root=tmp_path)
    for controller in ("memory", "cpuacct", "pids"):
        (tmp_path / controller / "codomyrmex-sandbox" / "done").mkdir(parents=True)
        (tmp_path / controller / "codomyrmex-sandbox" / "left").mkdir(parents=True)
    accounting.remove(accounting.parent_for("done"))
    assert not list(tmp_path.glob("*/codomyrmex-sandbox/done"))
    assert accounting.sweep() == 3
    assert not list(tmp_path.glob("*/codomyrmex-sandbox/*"))

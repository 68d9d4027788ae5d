"""Configuration and lifecycle (CFG-01 to CFG-07): what the engine was told, and what survives a crash.

CFG-04 (docker-bench-security) is not run: the tool is not part of this project's toolchain. The
container-runtime checks it would make (capabilities, privileged, mounts, network, pids, memory,
read-only root, no-new-privileges, user, logging) are asserted one by one in CFG-01 instead.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
LIMITS = {"timeout_seconds": T, "memory_mb": 256}
MIB = 1024 * 1024
LABEL = "io.codomyrmex.sandbox."


def check_hardened(info: dict, server_pid: int, memory_mb: int) -> list[str]:
    """Every hardening setting of one sandbox container, as the engine recorded it; the deviations."""
    host, config = info["HostConfig"], info["Config"]
    labels = config.get("Labels") or {}
    uid = labels.get(LABEL + "uid", "")
    expected = {
        "NetworkMode": (host["NetworkMode"], "none"),
        "CapDrop": (host.get("CapDrop"), ["ALL"]),
        "CapAdd": (host.get("CapAdd") or [], []),
        "no-new-privileges": (
            any(o in {"no-new-privileges:true", "no-new-privileges"} for o in host.get("SecurityOpt") or []),
            True,
        ),
        "seccomp not unconfined": ("seccomp=unconfined" in (host.get("SecurityOpt") or []), False),
        "ReadonlyRootfs": (host["ReadonlyRootfs"], True),
        "Privileged": (host["Privileged"], False),
        # A uid of its own, from the sandbox range, never root or the host's nobody (see identity.py).
        "User": (config["User"], f"{uid}:{uid}"),
        "uid in the sandbox range": (uid.isdigit() and 1_000_000_000 <= int(uid) < 1_001_000_000, True),
        "Name": (info["Name"], f"/codomyrmex-sandbox-u{uid}"),
        "Memory": (host["Memory"], memory_mb * MIB),
        "MemorySwap": (host["MemorySwap"], memory_mb * MIB),
        "PidsLimit": (host["PidsLimit"], 128),
        "NanoCpus": (host["NanoCpus"], 1_000_000_000),
        # The seccomp guard is the init (PID 1) and enforces the deadline; the engine removes the
        # container once it stops, server or no server.
        "Init": (bool(host.get("Init")), False),
        "AutoRemove": (host.get("AutoRemove"), True),
        "deadline": (config["Cmd"][1:3], ["--deadline", config["Cmd"][2]]),
        "deadline is a number": (config["Cmd"][2].isdigit(), True),
        # The container's stdin is the server's lease: its end (the server gone) ends the sandbox.
        "lease": (config["Cmd"][3], "--lease"),
        "Binds": (host.get("Binds") or [], []),
        "HostConfig.Mounts": (host.get("Mounts") or [], []),
        "Mounts": (info.get("Mounts") or [], []),
        "VolumesFrom": (host.get("VolumesFrom") or [], []),
        "Devices": (host.get("Devices") or [], []),
        "DeviceCgroupRules": (host.get("DeviceCgroupRules") or [], []),
        "PortBindings": (host.get("PortBindings") or {}, {}),
        "PublishAllPorts": (host.get("PublishAllPorts"), False),
        "PidMode": (host.get("PidMode") or "", ""),
        "IpcMode": (host.get("IpcMode"), "private"),
        "CgroupnsMode": (host.get("CgroupnsMode"), "private"),
        "UTSMode": (host.get("UTSMode") or "", ""),
        "UsernsMode": (host.get("UsernsMode") or "", ""),
        "OomKillDisable": (bool(host.get("OomKillDisable")), False),
        "LogConfig": (host["LogConfig"]["Type"], "none"),
        "Networks": (set((info["NetworkSettings"].get("Networks") or {}).keys()) <= {"none"}, True),
        "Env has no server variable": (
            [e for e in config.get("Env") or [] if e.split("=")[0].startswith(("CANARY", "DOCKER", "CODOMYRMEX"))],
            [],
        ),
        "Cmd": (config["Cmd"][0], "/opt/codomyrmex/seccomp-guard"),
        "Image": (config["Image"].startswith("codomyrmex-sandbox"), True),
        "ShmSize": (host.get("ShmSize"), 64 * MIB),
        "MaskedPaths": ("/proc/kcore" in (host.get("MaskedPaths") or []), True),
        "ReadonlyPaths": ("/proc/sys" in (host.get("ReadonlyPaths") or []), True),
        "label managed": (labels.get(LABEL + "managed"), "true"),
        "label owner-pid": (labels.get(LABEL + "owner-pid"), str(server_pid)),
        "label owner-host": (labels.get(LABEL + "owner-host"), socket.gethostname()),
        "label expires-at": (bool(re.fullmatch(r"\d+\.\d+", labels.get(LABEL + "expires-at", ""))), True),
        "label execution-id": (bool(labels.get(LABEL + "execution-id")), True),
    }
    problems = [f"{name}: {actual!r} (expected {wanted!r})" for name, (actual, wanted) in expected.items()]
    problems = [p for p, (actual, wanted) in zip(problems, expected.values(), strict=True) if actual != wanted]
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host.get("Ulimits") or []}
    for name, value in {"nofile": 256, "fsize": 64 * MIB, "core": 0}.items():
        if ulimits.get(name) != (value, value):
            problems.append(f"ulimit {name}: {ulimits.get(name)} (expected {value})")
    tmpfs = host.get("Tmpfs") or {}
    if set(tmpfs) != {"/tmp", "/sandbox"}:  # noqa: S108 - paths inside the sandbox
        problems.append(f"Tmpfs: {sorted(tmpfs)}")
    for target, options in tmpfs.items():
        for option in ("nosuid", "nodev", "size=64m"):
            if option not in options.split(","):
                problems.append(f"Tmpfs {target} lacks {option}: {options}")
    if f"uid={uid}" not in (tmpfs.get("/sandbox") or "").split(","):
        problems.append(f"Tmpfs /sandbox is not owned by the sandbox's uid {uid}: {tmpfs.get('/sandbox')}")
    return problems


async def test_docker_inspect_shows_every_hardening_setting_on_every_sandbox_of_the_server(server, engine, measure):
    """CFG-01"""
    gate = "sleep 20.0101"
    await engine.wait_for_warm_pool(server.pid)
    async with anyio.create_task_group() as tg:
        results: dict[str, dict] = {}

        async def run() -> None:
            results["run"] = await server.run(f"import subprocess\nsubprocess.run({gate.split()!r})", **LIMITS)

        tg.start_soon(run)
        running, process = await engine.wait_for_process(server.pid, gate)
        ids = [c["Id"] for c in engine.containers(owners={server.pid})]
        infos = {cid: await anyio.to_thread.run_sync(engine.inspect, cid) for cid in ids}
        engine.release(process)
    measure("runtime", infos[running]["HostConfig"].get("Runtime"))
    measure("containers_inspected", len(infos))

    assert results["run"]["status"] == "success"
    assert running in infos
    assert infos[running]["State"]["Running"] is True
    for cid, info in infos.items():
        problems = check_hardened(info, server.pid, 256)
        assert problems == [], f"sandbox {cid[:12]} ({info['Config']['Image']}) deviates: {problems}"
    images = {info["Config"]["Image"] for info in infos.values()}
    assert len(images) >= 3, f"every runtime's pool members should be checked, saw {images}"
    users = [info["Config"]["User"] for info in infos.values()]
    assert len(set(users)) == len(users), f"two live sandboxes share a uid: {users}"


def listening_sockets_of(pid: int) -> set[str]:
    """The inodes of the sockets that process ``pid`` holds and that listen (TCP, unix) or are bound (UDP)."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    listening = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
            parts = line.split()
            if not name.startswith("tcp") or parts[3] == "0A":
                listening.add(parts[9])
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening unix socket
            listening.add(parts[6])
    return held & listening


def vanished(path: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


async def test_the_stdio_server_exposes_no_listening_socket(server):
    """CFG-02"""
    exposed = await anyio.to_thread.run_sync(listening_sockets_of, server.pid)
    children = await anyio.run_process(["pgrep", "-P", str(server.pid)], check=False)

    assert exposed == set(), "the stdio server listens on a socket"
    assert children.stdout.split() == [], "the server runs child processes on the host"


async def test_doctor_reports_current_images_and_the_engine_versions(engine, measure):
    """CFG-03"""
    doctor = Path(sys.executable).parent / "codomyrmex-sandbox"
    with anyio.fail_after(120):
        completed = await anyio.run_process([str(doctor), "doctor"], check=False)
    output = (completed.stdout + completed.stderr).decode(errors="replace")
    info = engine.api.info()
    version = engine.api.version()
    measure("engine", info.get("ServerVersion"))
    measure("runc", (info.get("RuncCommit") or {}).get("ID"))
    measure("containerd", (info.get("ContainerdCommit") or {}).get("ID"))
    measure("kernel", info.get("KernelVersion"))
    measure("cgroup", f"v{info.get('CgroupVersion')} {info.get('CgroupDriver')}")
    measure("security_options", info.get("SecurityOptions"))

    assert completed.returncode == 0, output[-3000:]
    assert "all checks passed" in output
    assert "stale" not in output.lower()
    assert version.get("ApiVersion")


async def test_stdio_carries_only_json_rpc_even_with_debug_logging_errors_and_streaming(raw_launcher):
    """CFG-05"""
    async with raw_launcher(CODOMYRMEX_SANDBOX_LOG_LEVEL="debug") as raw:
        streamed = await raw.request(
            "tools/call",
            {
                "name": "execute_code",
                "arguments": {"code": "import sys\nfor i in range(3):\n    print(i, flush=True)\n1/0", **LIMITS},
                "_meta": {"progressToken": "p1"},
            },
        )
        refused = await raw.call_tool({"code": "print(1)", "timeout_seconds": 10_000})
        noisy = await raw.call_tool({"code": "import logging\nlogging.basicConfig()\nlogging.error('x')", **LIMITS})
        log = raw.log()
        lines = list(raw.lines)

    assert streamed["result"]["structuredContent"]["status"] == "error"
    assert refused["result"]["isError"] is True
    assert noisy["result"]["structuredContent"]["stderr"].startswith("ERROR:root:x")
    progress = [line for line in lines if b"notifications/progress" in line]
    assert progress, "no progress was streamed"
    assert log.strip(), "the server's logs should be on stderr"
    # raw_launcher checks, once the server stopped, that every stdout line was one JSON-RPC message.


async def test_every_status_leaves_no_container_and_no_cgroup_behind(launcher, engine):
    """CFG-06"""
    gate = "sleep 20.0606"
    programs = {
        "success": ("print(1)", {}),
        "error": ("1/0", {}),
        "timeout": ("while True:\n    pass", {"timeout_seconds": 1}),
        "memory_limit": ("x = b'x' * (400 << 20)", {"memory_mb": 64}),
        "output_limit": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", {}),
        "killed": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", {}),
    }
    statuses = {}
    cgroups: list[Path] = []
    async with launcher() as server:
        owner = server.pid
        for expected, (code, options) in programs.items():
            result = await server.run(code, **{**LIMITS, **options})
            statuses[expected] = result["status"]
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:

            async def cancelled() -> None:
                with scope:
                    await server.call({"code": f"import subprocess\nsubprocess.run({gate.split()!r})", **LIMITS})

            tg.start_soon(cancelled)
            container, process = await engine.wait_for_process(owner, gate)
            memory = engine.cgroup_file(process, "memory", "")
            if memory is not None and "codomyrmex" in str(memory.parent):
                cgroups.append(memory.parent)  # the per-execution accounting cgroup, where accounting is on
            scope.cancel()
        await engine.wait_until_removed(container)
        after = await server.run("print('after cancel')", **LIMITS)
    gone = await engine.wait_until_gone(owner)

    assert statuses == {status: status for status in programs}
    assert after["stdout"] == "after cancel\n"
    assert gone < 10
    for directory in cgroups:
        gone_now = await anyio.to_thread.run_sync(vanished, directory, 10)
        assert gone_now, f"the accounting cgroup {directory} was left behind"


async def test_after_a_server_is_killed_the_next_server_removes_its_sandboxes_at_startup(launcher, engine, measure):
    """CFG-07"""
    gate = "sleep 60.0707"
    failures: list[BaseException] = []
    async with launcher(check_on_close=False) as doomed:
        owner = doomed.pid
        async with anyio.create_task_group() as tg:

            async def long_call() -> None:
                try:
                    await doomed.call(
                        {"code": f"import subprocess\nsubprocess.run({gate.split()!r})", "timeout_seconds": 60}
                    )
                except Exception as exc:  # noqa: BLE001 - the server dying under the call is the point
                    failures.append(exc)

            tg.start_soon(long_call)
            container, _ = await engine.wait_for_process(owner, gate)
            os.kill(owner, signal.SIGKILL)
    left_by_the_crash = {c["Id"] for c in engine.containers(owners={owner})}
    assert container in left_by_the_crash, "the test needs the killed server's sandbox to outlive it"
    assert not engine.process_alive(owner)

    start = time.monotonic()
    async with launcher() as successor:
        connected = time.monotonic() - start
        removed_after = await engine.wait_until_gone(owner, within=5)
        result = await successor.run("print('recovered')", **LIMITS)
    measure("orphans_left_by_the_crash", len(left_by_the_crash))
    measure("successor_connected_seconds", round(connected, 3))
    measure("orphans_removed_after_connect_seconds", round(removed_after, 3))

    assert failures, "the call survived its server being killed"
    assert removed_after < 1.0, "the orphans were not removed by the successor's startup sweep"
    assert result["stdout"] == "recovered\n"
    assert not [p for p in engine.host_processes() if p.container in left_by_the_crash]

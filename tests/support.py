"""Helpers that the integration and security suites share (their conftests import them)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import docker
import docker.errors
import pytest
import requests.exceptions

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.backends.docker import LABEL_EXECUTION as EXECUTION_ID
from codomyrmex_sandbox.backends.docker import LABEL_HOST as OWNER_HOST
from codomyrmex_sandbox.backends.docker import LABEL_PID as OWNER_PID
from codomyrmex_sandbox.backends.docker import MANAGED
from codomyrmex_sandbox.runtimes import load_runtimes

# The uids sandboxes run as with the default settings: one per live sandbox (backends/identity.py).
_UID_BASE = Settings.model_fields["sandbox_uid_base"].default
SANDBOX_UIDS = range(_UID_BASE, _UID_BASE + Settings.model_fields["sandbox_uid_count"].default)

__all__ = [
    "EXECUTION_ID",
    "FIX_ENGINE",
    "FIX_IMAGES",
    "MANAGED",
    "OWNER_HOST",
    "OWNER_PID",
    "SANDBOX_UIDS",
    "TOOL",
    "OwnedSandboxes",
    "checked_engine",
    "child_with_variable",
    "console_script",
    "control_engine",
    "describe",
    "inherited_environment",
]

TOOL = "execute_code"
FIX_ENGINE = "start the Docker engine (e.g. `sudo systemctl start docker`) or set DOCKER_HOST"
FIX_IMAGES = "run `codomyrmex-sandbox runtimes build`"


ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "engine"


def control_engine(action: str) -> None:
    """Stop or start the local engine with scripts/engine, as an operator or a crash would.

    The fault tests take the engine away under a running server; they need to be allowed to (root,
    as on CI and these machines), and are skipped with the reason where they are not.
    """
    if os.geteuid() != 0:
        pytest.skip("stopping and starting the Docker engine needs root")
    completed = subprocess.run([str(ENGINE_SCRIPT), action], check=False, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        pytest.fail(f"scripts/engine {action} failed: {completed.stderr[-2000:]}")


def console_script() -> str:
    """The venv's ``codomyrmex-sandbox`` script, next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "codomyrmex-sandbox"
    if script.exists():
        return str(script)
    found = shutil.which("codomyrmex-sandbox")
    if found is None:
        pytest.fail("the codomyrmex-sandbox console script is not installed; run `pip install -e .`", pytrace=False)
    return found


def inherited_environment() -> dict[str, str]:
    """What a server started by a test takes from the test's environment: PATH, the engine's address,
    the operator's settings, and PYTHONPATH (so that it runs the same code as the test process)."""
    wanted = ("CODOMYRMEX_SANDBOX_", "DOCKER_", "PYTHONPATH")
    passed = {name: value for name, value in os.environ.items() if name.startswith(wanted)}
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **passed}


def describe(containers: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{c['Id'][:12]} ({c.get('State')}, {(c.get('Labels') or {}).get(EXECUTION_ID)})" for c in containers
    )


def checked_engine(settings: Settings, suite: str) -> docker.DockerClient:
    """A client for the engine, which must be reachable and hold every runtime image: else the suite
    fails (never skips) with the command that fixes it."""
    try:
        client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        pytest.fail(
            f"the {suite} tests need a running Docker engine, and it is not reachable ({exc}); {FIX_ENGINE}.",
            pytrace=False,
        )
    missing = []
    for spec in load_runtimes(settings.runtimes_dir, settings.languages).values():
        image = spec.image(settings.image_prefix)
        try:
            client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if missing:
        client.close()
        pytest.fail(f"runtime images are missing or stale: {', '.join(missing)}; {FIX_IMAGES}.", pytrace=False)
    return client


def child_with_variable(variable: str, value: str) -> int:
    """The pid of this process's one child whose environment has ``variable=value`` (a server it started)."""
    marker = f"{variable}={value}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            if parent == me and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    if len(found) != 1:
        pytest.fail(f"expected one server child with {variable} set, found pids {found}")
    return found[0]


@dataclass
class OwnedSandboxes:
    """The project's containers that belong to given owners (this test process, servers it started).

    Only those count, so that another test run on the same machine cannot make a suite fail.
    """

    api: docker.APIClient
    owners: set[int] = field(default_factory=set)
    host: str = field(default_factory=socket.gethostname)

    def containers(self, *, owners: set[int] | None = None, running: bool = False) -> list[dict[str, Any]]:
        filters: dict[str, Any] = {"label": f"{MANAGED}=true"}
        if running:
            filters["status"] = "running"
        pids = {str(pid) for pid in (self.owners if owners is None else owners)}
        found = self.api.containers(all=True, filters=filters)
        return [
            c
            for c in found
            if (c.get("Labels") or {}).get(OWNER_HOST) == self.host and (c.get("Labels") or {}).get(OWNER_PID) in pids
        ]

    async def wait_until_gone(self, owner: int, *, within: float = 10.0) -> float:
        """Seconds until ``owner`` has no sandbox container left; fails after ``within`` seconds."""
        start = time.monotonic()
        while True:
            found = await anyio.to_thread.run_sync(partial(self.containers, owners={owner}))
            if not found:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"sandbox containers of pid {owner} still exist {within} s later: {describe(found)}")
            await anyio.sleep(0.02)

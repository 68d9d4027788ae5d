"""The backends under test: each one that is available here, behind one `Subject`.

The contract (tests/conformance/test_*.py) is written once against the public API, a `Sandbox`
on a backend, and runs against every backend here: the fake (everywhere) and Docker (marked
``docker``; it needs the engine and the runtime images, and fails, never skips, when they are
missing, with the command that fixes it). A later backend (bubblewrap, Kubernetes) joins by
adding a `Subject` and a parameter of `subject`, and must pass the suite unchanged.

What a test needs to observe of a backend that the public API does not show (is a program still
running? is anything of a closed Sandbox left?) is the `Subject`'s part: the fake's process table
is what its plays say (`programs.running`), Docker's is the engine's.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import docker.errors
import pytest
import pytest_asyncio

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.backends.docker import LABEL_INSTANCE
from tests.conformance.programs import FAKE_PROCESSES, OUTPUT_CAP, play
from tests.support import OwnedSandboxes, describe, engine_fixture, owned_by_a_task

SETTLE_DEADLINE = 10.0  # for what a call or a Sandbox leaves to be gone (the engine removes containers)
START_DEADLINE = 20.0  # for a program to be seen running


@dataclass
class Subject:
    """A backend under test, as the contract sees it: Sandboxes on it, and what only it can observe."""

    name: str
    real: bool  # runs programs for real, in real isolation
    settings: Settings
    sandbox: Sandbox | None = None  # the module's open Sandbox, shared by its tests

    def new_sandbox(self, **settings: Any) -> Sandbox:
        """A fresh (unopened) Sandbox on this backend, with the suite's settings and ``settings``."""
        raise NotImplementedError

    @property
    def shared(self) -> Sandbox:
        assert self.sandbox is not None, "the subject fixture opens the module's Sandbox"
        return self.sandbox

    async def wait_until_running(self, marker: str) -> str:
        """A handle on the running sandbox whose program shows ``marker`` (`programs.running`)."""
        raise NotImplementedError

    def is_running(self, handle: str) -> bool:
        """Whether that sandbox still runs its program."""
        raise NotImplementedError

    async def wait_until_gone(self, handle: str) -> float:
        """Seconds until nothing of that sandbox is left; fails after `SETTLE_DEADLINE`."""
        raise NotImplementedError

    async def wait_until_nothing_runs(self, marker: str) -> float:
        """Seconds until no sandbox runs a program that shows ``marker``; fails after `SETTLE_DEADLINE`."""
        raise NotImplementedError

    async def leftovers(self, execution_id: str) -> list[str]:
        """What of a finished execution is still there after `SETTLE_DEADLINE` (nothing, by contract)."""
        raise NotImplementedError

    def snapshot(self) -> set[str]:
        """What of this backend exists now (to compare against after a Sandbox closed)."""
        raise NotImplementedError

    async def left_since(self, before: set[str]) -> list[str]:
        """What exists that did not at ``before``, after waiting up to `SETTLE_DEADLINE` for it to go."""
        raise NotImplementedError

    def missing_runtime(self) -> Sandbox:
        """A Sandbox on which no runtime is ready (the engine lacks its image, say)."""
        raise NotImplementedError


@dataclass
class FakeSubject(Subject):
    backends: list[FakeBackend] = field(default_factory=list)

    def new_sandbox(self, **settings: Any) -> Sandbox:
        backend = FakeBackend(play)
        self.backends.append(backend)
        return Sandbox(self.settings.model_copy(update=settings), backend=backend)

    async def wait_until_running(self, marker: str) -> str:
        await _poll_until(lambda: marker in FAKE_PROCESSES, f"the fake never played {marker!r}", START_DEADLINE)
        return marker

    def is_running(self, handle: str) -> bool:
        return handle in FAKE_PROCESSES

    async def wait_until_gone(self, handle: str) -> float:
        return await self.wait_until_nothing_runs(handle)

    async def wait_until_nothing_runs(self, marker: str) -> float:
        return await _poll_until(
            lambda: marker not in FAKE_PROCESSES, f"the fake still plays {marker!r}", SETTLE_DEADLINE
        )

    async def leftovers(self, execution_id: str) -> list[str]:  # noqa: ARG002 - the fake has one table for all
        return self._running()

    def snapshot(self) -> set[str]:
        return set(self._running()) | set(self._open())

    async def left_since(self, before: set[str]) -> list[str]:
        return [item for item in self._open() + self._running() if item not in before]

    def missing_runtime(self) -> Sandbox:
        backend = FakeBackend(play, missing=frozenset(self.settings.languages or ("python", "javascript", "bash")))
        return Sandbox(self.settings, backend=backend)

    def _open(self) -> list[str]:
        return [f"open backend {id(backend):x}" for backend in self.backends if backend.opened and not backend.closed]

    def _running(self) -> list[str]:
        plays = [f"a play of {marker!r}" for marker in sorted(FAKE_PROCESSES)]
        return plays + [f"{backend.running} running executions" for backend in self.backends if backend.running]


@dataclass
class DockerSubject(Subject):
    engine: OwnedSandboxes | None = None
    owner: int = field(default_factory=os.getpid)

    @property
    def docker(self) -> OwnedSandboxes:
        assert self.engine is not None
        return self.engine

    def new_sandbox(self, **settings: Any) -> Sandbox:
        return Sandbox(self.settings.model_copy(update=settings))

    async def wait_until_running(self, marker: str) -> str:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            found = await anyio.to_thread.run_sync(self.docker.sandbox_running, self.owner, marker)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"no running sandbox ran {marker!r} within {START_DEADLINE} s")
            await anyio.sleep(0.02)

    def is_running(self, handle: str) -> bool:
        return self.docker.is_running(handle)

    async def wait_until_nothing_runs(self, marker: str) -> float:
        return await self.docker.wait_until_no_sandbox_runs(self.owner, marker, within=SETTLE_DEADLINE)

    async def wait_until_gone(self, handle: str) -> float:
        def exists() -> bool:
            try:
                self.docker.api.inspect_container(handle)
            except docker.errors.NotFound:
                return False
            return True

        start = time.monotonic()
        while await anyio.to_thread.run_sync(exists):
            if time.monotonic() - start > SETTLE_DEADLINE:
                pytest.fail(f"sandbox {handle[:12]} still exists {SETTLE_DEADLINE} s later")
            await anyio.sleep(0.02)
        return time.monotonic() - start

    async def leftovers(self, execution_id: str) -> list[str]:
        start = time.monotonic()
        while True:
            found = await anyio.to_thread.run_sync(self.docker.for_execution, execution_id)
            if not found or time.monotonic() - start > SETTLE_DEADLINE:
                return [describe(found)] if found else []
            await anyio.sleep(0.02)

    def snapshot(self) -> set[str]:
        """The Sandboxes (backend instances) that have containers now: another one's pool refills."""
        return {_instance(c) for c in self.docker.containers(owners={self.owner})}

    async def left_since(self, before: set[str]) -> list[str]:
        start = time.monotonic()
        while True:
            found = await anyio.to_thread.run_sync(partial(self.docker.containers, owners={self.owner}))
            new = [c for c in found if _instance(c) not in before]
            if not new or time.monotonic() - start > SETTLE_DEADLINE:
                return [describe(new)] if new else []
            await anyio.sleep(0.05)

    def missing_runtime(self) -> Sandbox:
        # Images are named by prefix and recipe digest: under another prefix, none exists.
        return self.new_sandbox(image_prefix="codomyrmex-conformance-absent", pool_size=0)


def _instance(container: dict[str, Any]) -> str:
    return str((container.get("Labels") or {}).get(LABEL_INSTANCE))


async def _poll_until(condition: Callable[[], bool], failure: str, within: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            pytest.fail(f"{failure} {within} s later")
        await anyio.sleep(0.01)
    return time.monotonic() - start


# The engine, checked once per session when a Docker case runs: reachable, every runtime image built.
engine = engine_fixture(OwnedSandboxes, "conformance")


@pytest.fixture(scope="session")
def conformance_settings() -> Settings:
    """The operator's settings, with the suite's output cap."""
    return Settings.load(max_output_bytes=OUTPUT_CAP)


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["fake", pytest.param("docker", marks=pytest.mark.docker)],
)
async def subject(request: pytest.FixtureRequest, conformance_settings: Settings) -> AsyncIterator[Subject]:
    """Each backend in turn, with an open Sandbox that the module's tests share; after it closes,
    nothing of it may be left."""
    made: Subject
    if request.param == "docker":
        owned = request.getfixturevalue("engine")
        made = DockerSubject("docker", real=True, settings=conformance_settings, engine=owned)
    else:
        made = FakeSubject("fake", real=False, settings=conformance_settings)
    before = made.snapshot()
    async with owned_by_a_task(made.new_sandbox(), f"{made.name}-sandbox-owner") as opened:
        made.sandbox = opened
        yield made
    made.sandbox = None
    left = await made.left_since(before)
    assert not left, f"the {made.name} backend left this behind after its Sandbox closed: {left}"

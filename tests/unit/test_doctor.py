"""doctor warns about weak settings of the engine, without failing."""

from __future__ import annotations

import io

import pytest

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.backends import docker as docker_package
from codomyrmex_sandbox.backends.docker import backend as docker_backend
from codomyrmex_sandbox.backends.docker.engine import Engine
from codomyrmex_sandbox.doctor import doctor, engine_warnings
from codomyrmex_sandbox.runtimes import VERSION_LABEL

STRONG_INFO = {"SecurityOptions": ["name=seccomp,profile=default", "name=userns"], "Runtimes": {"runsc": {}}}
STRONG_VERSION = {"Components": [{"Name": "runc", "Version": "1.1.14"}]}


def well_set(**overrides: object) -> Settings:
    """gVisor, and sandbox uids inside what a remapping engine maps by default."""
    values = {"oci_runtime": "runsc", "sandbox_uid_base": 1000, "sandbox_uid_count": 60_000} | overrides
    return Settings.load(backend="fake", **values)


def test_a_well_set_engine_gets_no_warning():
    assert engine_warnings(well_set(), STRONG_INFO, STRONG_VERSION) == []


def test_sandbox_uids_outside_what_a_remapping_engine_maps_are_warned_about():
    warnings = engine_warnings(Settings.load(backend="fake", oci_runtime="runsc"), STRONG_INFO, STRONG_VERSION)
    assert len(warnings) == 1
    assert "sandbox uids go up to 1000999999" in warnings[0]
    assert "set sandbox_uid_base and sandbox_uid_count inside the mapped range" in warnings[0]


def test_runc_without_gvisor_user_namespaces_or_the_leaky_vessels_fix_is_warned_about():
    weak_info = {"SecurityOptions": ["name=seccomp,profile=default"], "Runtimes": {"runc": {}}}
    weak_version = {"Components": [{"Name": "runc", "Version": "1.1.5+ds1"}]}
    warnings = " | ".join(engine_warnings(Settings.load(backend="fake"), weak_info, weak_version))
    assert "gVisor (runsc) is not" in warnings
    assert "no user namespaces" in warnings
    assert "CVE-2024-21626" in warnings


def test_gvisor_installed_but_unused_is_pointed_out():
    warnings = engine_warnings(well_set(oci_runtime=None), STRONG_INFO, STRONG_VERSION)
    assert len(warnings) == 1
    assert warnings[0].endswith('gVisor (runsc) is installed: set oci_runtime = "runsc"')


class RecordingDockerClient:
    """Stands in for docker-py's client: answers what a health check needs, records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def api(self) -> RecordingDockerClient:
        return self

    def info(self) -> dict[str, object]:
        self.calls.append("info")
        return {"CgroupVersion": "2", "CgroupDriver": "unknown-to-the-test", "Runtimes": {"runc": {}}}

    def version(self) -> dict[str, object]:
        self.calls.append("version")
        return {"Version": "27.0", "ApiVersion": "1.46", "Components": []}

    def inspect_image(self, image: str) -> dict[str, object]:
        self.calls.append("inspect_image")
        return {"Config": {"Labels": {VERSION_LABEL: f"version of {image}"}}}

    def containers(self, **_: object) -> list[object]:
        self.calls.append("containers")
        return []

    def close(self) -> None:
        self.calls.append("close")

    def __getattr__(self, name: str) -> object:
        self.calls.append(name)
        raise AssertionError(f"the engine was asked for {name}")


@pytest.fixture
def recording_engine(monkeypatch: pytest.MonkeyPatch) -> RecordingDockerClient:
    client = RecordingDockerClient()
    for module in (docker_package, docker_backend):
        monkeypatch.setattr(module, "connect", lambda _settings: Engine(client))  # type: ignore[arg-type]
    return client


async def test_doctor_asks_the_engine_and_the_images_but_starts_creates_and_sweeps_nothing(recording_engine):
    out = io.StringIO()
    await doctor(Settings.load(backend="docker", pool_size=2), out)
    assert "runtimes:" in out.getvalue()
    assert "ok   python: version of" in out.getvalue()
    assert set(recording_engine.calls) == {"info", "version", "inspect_image", "close"}


async def test_an_opened_backend_sweeps_what_was_left_behind_which_doctor_does_not(recording_engine):
    """The counterpart of the test above: the same recording sees the sweep when a server opens the backend."""
    sandbox = Sandbox(Settings.load(backend="docker", pool_size=0))
    await sandbox.backend.open()
    await sandbox.backend.aclose()
    assert "containers" in recording_engine.calls

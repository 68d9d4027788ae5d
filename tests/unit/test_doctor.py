"""doctor warns about weak settings of the engine, without failing."""

from __future__ import annotations

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.doctor import engine_warnings

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

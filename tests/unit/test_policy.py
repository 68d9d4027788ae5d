"""The policy is a ceiling: requests resolve to effective limits or to a denial naming the cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codomyrmex_sandbox import (
    ConfigurationError,
    InvalidRequestError,
    LimitAboveCapError,
    Settings,
    UnknownLanguageError,
)
from codomyrmex_sandbox.backends.docker.egress import BRIDGE, firewall_rules
from codomyrmex_sandbox.models import ExecutionRequest, Limits, request_from_arguments
from codomyrmex_sandbox.policy import check_payload, default_limits, resolve_limits, resolve_policies

LANGUAGES = ["bash", "javascript", "python"]


def settings(**overrides: object) -> Settings:
    return Settings.load(backend="fake", **overrides)


def effective(request: ExecutionRequest, settings: Settings) -> Limits:
    return resolve_limits(request, resolve_policies(settings, LANGUAGES))


def payload(request: ExecutionRequest, settings: Settings) -> tuple[bytes, bytes | None]:
    return check_payload(request, settings.policy(request.language))


def test_defaults_come_from_the_policy_when_the_request_names_none():
    limits = effective(ExecutionRequest(code="x"), settings())
    assert limits.timeout_seconds == 30
    assert limits.memory_mb == 256
    assert limits.pids == 128
    assert limits.open_files == 256
    assert limits.network == "none"


def test_a_request_may_lower_limits():
    limits = effective(ExecutionRequest(code="x", timeout_seconds=0.5, memory_mb=32), settings())
    assert (limits.timeout_seconds, limits.memory_mb) == (0.5, 32)


def test_a_timeout_above_the_cap_is_denied_naming_the_cap():
    with pytest.raises(LimitAboveCapError, match=r"timeout_seconds=301 is above this server's cap of 300"):
        effective(ExecutionRequest(code="x", timeout_seconds=301), settings())


def test_memory_above_the_cap_is_denied_naming_the_cap():
    with pytest.raises(LimitAboveCapError, match=r"memory_mb=4096 .* cap of 2048 MiB"):
        effective(ExecutionRequest(code="x", memory_mb=4096), settings())


def test_an_operator_cap_applies_to_every_request():
    strict = settings(max_timeout_seconds=5, default_timeout_seconds=5)
    with pytest.raises(LimitAboveCapError):
        effective(ExecutionRequest(code="x", timeout_seconds=6), strict)


@given(timeout=st.floats(min_value=1e-3, max_value=1e6), memory=st.integers(min_value=16, max_value=10**6))
def test_effective_limits_never_exceed_the_caps(timeout: float, memory: int):
    policy = settings(max_timeout_seconds=60, default_timeout_seconds=10, max_memory_mb=512)
    request = ExecutionRequest(code="x", timeout_seconds=timeout, memory_mb=memory)
    if timeout > 60 or memory > 512:
        with pytest.raises(LimitAboveCapError):
            effective(request, policy)
    else:
        limits = effective(request, policy)
        assert (limits.timeout_seconds, limits.memory_mb) == (timeout, memory)


def test_an_unknown_language_is_denied_listing_the_known_ones():
    with pytest.raises(UnknownLanguageError, match=r"unknown language 'ruby'; use one of: bash, javascript, python"):
        effective(ExecutionRequest(code="x", language="ruby"), settings())


@pytest.mark.parametrize(
    "arguments",
    [
        {"code": "x", "timeout_seconds": -1},
        {"code": "x", "timeout_seconds": 0},
        {"code": "x", "timeout_seconds": math.nan},
        {"code": "x", "timeout_seconds": math.inf},
        {"code": "x", "timeout_seconds": "10s"},
        {"code": "x", "timeout_seconds": True},
        {"code": "x", "memory_mb": 5},
        {"code": "x", "memory_mb": -1},
        {"code": "x", "memory_mb": "256m; --privileged"},
        {"code": "x", "memory_mb": 256.5},
        {"code": 12},
        {"code": "x", "image": "alpine"},
        {"code": "x", "privileged": True},
        {"code": "x", "network": "host"},
        {},
    ],
)
def test_malformed_arguments_are_rejected_with_a_message_naming_them(arguments):
    with pytest.raises(InvalidRequestError, match="invalid arguments"):
        request_from_arguments(arguments)


def test_an_unknown_argument_is_named_with_the_accepted_ones():
    with pytest.raises(InvalidRequestError, match=r"unknown argument 'image' \(accepted: code, language"):
        request_from_arguments({"code": "x", "image": "alpine"})


def test_nul_bytes_in_code_are_rejected():
    with pytest.raises(InvalidRequestError, match="NUL"):
        payload(ExecutionRequest(code="print(1)\x00"), settings())


def test_lone_surrogates_are_rejected():
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        payload(ExecutionRequest(code="print('\ud800')"), settings())


def test_code_over_the_cap_is_rejected_with_its_size():
    with pytest.raises(InvalidRequestError, match=r"code is 2001 bytes, above this server's cap of 2000"):
        payload(ExecutionRequest(code="#" * 2001), settings(max_code_bytes=2000))


def test_stdin_over_the_cap_is_rejected():
    with pytest.raises(InvalidRequestError, match="stdin is"):
        payload(ExecutionRequest(code="x", stdin="y" * 11), settings(max_stdin_bytes=10))


def test_empty_code_is_rejected():
    with pytest.raises(InvalidRequestError, match="empty"):
        payload(ExecutionRequest(code="  \n"), settings())


def test_settings_reject_a_default_above_its_cap():
    with pytest.raises(ConfigurationError, match="default_timeout_seconds must not exceed"):
        settings(default_timeout_seconds=500)


def test_settings_read_the_environment_and_a_toml_file(tmp_path, monkeypatch):
    config = tmp_path / "sandbox.toml"
    config.write_text("max_timeout_seconds = 60\ndefault_timeout_seconds = 20\nmax_memory_mb = 1024\n")
    monkeypatch.setenv("CODOMYRMEX_SANDBOX_MAX_MEMORY_MB", "512")
    loaded = Settings.load(config)
    assert loaded.max_timeout_seconds == 60
    assert loaded.max_memory_mb == 512  # the environment wins over the file


def test_a_broken_config_file_is_reported_clearly(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("max_timeout_seconds = [")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        Settings.load(config)
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        Settings.load(tmp_path / "missing.toml")
    config.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigurationError, match="no_such_setting"):
        Settings.load(config)


def test_a_profile_replaces_the_base_limits_and_is_a_ceiling_too():
    strict = settings(profile="strict")
    limits = effective(ExecutionRequest(code="x"), strict)
    assert (limits.timeout_seconds, limits.memory_mb, limits.pids, limits.cpus) == (10, 128, 64, 0.5)
    with pytest.raises(LimitAboveCapError, match="cap of 30 seconds"):
        effective(ExecutionRequest(code="x", timeout_seconds=31), strict)
    with pytest.raises(InvalidRequestError, match="cap of 262144 bytes"):
        payload(ExecutionRequest(code="#" * 300_000), strict)


def test_operator_profiles_and_per_language_overrides_apply_in_that_order():
    custom = settings(
        profile="teaching",
        profiles={"teaching": {"default_timeout_seconds": 5, "max_timeout_seconds": 20}},
        language_limits={"javascript": {"default_memory_mb": 512, "max_memory_mb": 1024}},
    )
    python = effective(ExecutionRequest(code="x"), custom)
    node = effective(ExecutionRequest(code="x", language="javascript"), custom)
    assert (python.timeout_seconds, python.memory_mb) == (5, 256)
    assert (node.timeout_seconds, node.memory_mb) == (5, 512)
    with pytest.raises(LimitAboveCapError, match="cap of 1024 MiB"):
        effective(ExecutionRequest(code="x", language="javascript", memory_mb=2048), custom)
    effective(ExecutionRequest(code="x", memory_mb=2048), custom)  # python keeps the base cap


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"profile": "nope"}, "unknown profile 'nope'; known: data-science, default, strict"),
        ({"language_limits": {"python": {"max_memory_mb": 8}}}, "max_memory_mb"),
        ({"language_limits": {"python": {"default_timeout_seconds": 400}}}, r"language_limits\['python'\]: .*must not"),
        ({"profiles": {"x": {"no_such_limit": 1}}, "profile": "x"}, "no_such_limit"),
        ({"profiles": {"unused": {"max_timeout_seconds": 1}}}, "profile 'unused'"),
    ],
)
def test_a_broken_policy_is_refused_when_the_settings_load(overrides, message):
    with pytest.raises(ConfigurationError, match=message):
        settings(**overrides)


@given(
    default=st.integers(min_value=16, max_value=4096),
    cap=st.integers(min_value=16, max_value=4096),
    asked=st.integers(min_value=16, max_value=8192) | st.none(),
)
def test_per_language_caps_are_never_exceeded_whatever_the_overrides(default: int, cap: int, asked: int | None):
    overrides = {"bash": {"default_memory_mb": default, "max_memory_mb": cap}}
    if default > cap:
        with pytest.raises(ConfigurationError):
            settings(language_limits=overrides)
        return
    policy = settings(language_limits=overrides)
    request = ExecutionRequest(code="x", language="bash", memory_mb=asked)
    if asked is not None and asked > cap:
        with pytest.raises(LimitAboveCapError):
            effective(request, policy)
    else:
        assert effective(request, policy).memory_mb == (default if asked is None else asked) <= cap


def test_the_network_mode_is_part_of_the_policy_and_egress_can_be_granted_per_language():
    policy = settings(language_limits={"python": {"network": "egress"}})
    assert effective(ExecutionRequest(code="x"), policy).network == "egress"
    assert effective(ExecutionRequest(code="x", language="bash"), policy).network == "none"
    with pytest.raises(ConfigurationError, match="network"):
        settings(network="host")


def test_the_egress_firewall_drops_the_host_and_every_non_public_range():
    rules = firewall_rules()
    assert ("INPUT", ["-i", BRIDGE, "-m", "comment", "--comment", "codomyrmex-sandbox egress", "-j", "DROP"]) in rules
    dropped = {rule[rule.index("-d") + 1] for chain, rule in rules if chain == "DOCKER-USER"}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"} <= dropped
    assert all(rule[-2:] == ["-j", "DROP"] for _, rule in rules)


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_languages_default_limits_are_those_of_a_call_that_asks_for_nothing(language: str):
    custom = settings(profile="strict", language_limits={"bash": {"default_timeout_seconds": 7, "network": "egress"}})
    policies = resolve_policies(custom, LANGUAGES)
    assert set(policies) == set(LANGUAGES)
    assert default_limits(policies[language]) == effective(ExecutionRequest(code="x", language=language), custom)

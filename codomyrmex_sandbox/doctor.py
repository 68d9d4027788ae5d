"""`codomyrmex-sandbox doctor`: is this host ready, and what exactly fixes what is not."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib import metadata
from typing import Any, TextIO

import anyio.to_thread

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.runtimes import load_runtimes
from codomyrmex_sandbox.service import Sandbox
from codomyrmex_sandbox.settings import LIMIT_FIELDS, Settings

FIX_IMAGES = "codomyrmex-sandbox runtimes build"


async def doctor(settings: Settings, out: TextIO) -> int:
    """Print a report; exit status 0 when every check passed, 1 otherwise."""

    def line(text: str = "") -> None:
        out.write(text + "\n")

    line(f"codomyrmex-sandbox {__version__}")
    for package in ("mcp", "docker", "pydantic", "anyio", "structlog", "uvicorn", "prometheus-client", "PyJWT"):
        line(f"  {package} {_version_of(package)}")
    line()
    line(f"backend: {settings.backend}")
    problems: list[str] = []
    if settings.backend == "docker":
        problems += await anyio.to_thread.run_sync(_check_engine, settings, line)
    line()
    problems += await _check_runtimes(settings, line)
    line()
    problems += _check_http(settings, line)
    _print_policy(settings, line)
    line()
    if problems:
        line("problems:")
        for problem in dict.fromkeys(problems):
            line(f"  - {problem}")
        return 1
    line("all checks passed")
    return 0


async def _check_runtimes(settings: Settings, line: Callable[[str], None]) -> list[str]:
    """Ask the backend about each runtime, without opening it.

    The Sandbox is built but never entered: entering opens the backend, which takes charge of the
    engine (it sweeps containers left behind) and starts its upkeep (the warm pool, the reaper). A
    health check must create and remove nothing, so only the backend's `runtime_status` is asked.
    """
    try:
        sandbox = Sandbox(settings)
    except SandboxError as exc:
        line(f"runtimes: FAIL {exc}")
        return [str(exc)]
    problems = []
    try:
        statuses = [await sandbox.backend.runtime_status(spec) for spec in sandbox.runtimes.values()]
    finally:
        await sandbox.backend.aclose()
    line("runtimes:")
    for status in statuses:
        mark = "ok  " if status.ready else "FAIL"
        line(f"  {mark} {status.name}: {status.version or '-'} ({status.detail})")
        if not status.ready:
            problems.append(f"runtime {status.name} is not ready; fix: {FIX_IMAGES}")
    return problems


def _check_http(settings: Settings, line: Callable[[str], None]) -> list[str]:
    """The HTTP transport's authentication, when it is selected: what `serve` would refuse, said now."""
    if settings.transport != "http":
        return []
    from codomyrmex_sandbox.auth import TokenFile, check_jwks_url  # noqa: PLC0415 - only HTTP needs it
    from codomyrmex_sandbox.http_server import check_http_settings  # noqa: PLC0415

    problems = []
    line(f"http: {settings.http_host}:{settings.http_port}")
    try:
        check_http_settings(settings)
        if settings.auth_tokens_file is not None:
            line(f"  ok   auth_tokens_file: {len(TokenFile(settings.auth_tokens_file))} tokens")
        if settings.auth_jwks_url is not None:
            check_jwks_url(settings.auth_jwks_url)
            line(f"  ok   JWT issuer {settings.auth_jwt_issuer}")
        if settings.insecure_no_auth:
            line("  WARN no authentication (insecure_no_auth): loopback development only")
    except SandboxError as exc:
        line(f"  FAIL {exc}")
        problems.append(str(exc))
    line("")
    return problems


def _print_policy(settings: Settings, line: Callable[[str], None]) -> None:
    line(f"effective policy, profile {settings.profile!r} (caps a call can never exceed):")
    languages = settings.languages or sorted(load_runtimes(settings.runtimes_dir))
    for language in languages:
        limits = settings.policy(language).model_dump(mode="json")
        line(f"  {language}: " + ", ".join(f"{key}={json.dumps(value)}" for key, value in limits.items()))
    line("server settings:")
    server: dict[str, Any] = settings.model_dump(
        mode="json", exclude={"docker_host", "profiles", "language_limits", *LIMIT_FIELDS}
    )
    for key, value in server.items():
        line(f"  {key} = {json.dumps(value)}")


def _check_engine(settings: Settings, line: Callable[[str], None]) -> list[str]:
    from codomyrmex_sandbox.backends.docker import connect  # noqa: PLC0415 - docker-py only when needed

    try:
        engine = connect(settings)
    except SandboxError as exc:
        line(f"  engine: FAIL {exc}")
        fix = (
            "sudo apt-get install docker.io && sudo dockerd &" if shutil.which("dockerd") is None else "sudo dockerd &"
        )
        return [f"the Docker engine is not reachable; fix: {fix}"]
    try:
        info = engine.info()
        version = engine.version()
    finally:
        engine.close()
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    line(f"  engine: ok  Docker {version.get('Version')} (API {version.get('ApiVersion')})")
    line(f"  kernel {info.get('KernelVersion')}, cgroup v{info.get('CgroupVersion', '?')}, {info.get('Driver')}")
    line(f"  OCI runtimes: {', '.join(runtimes)}; security: {', '.join(info.get('SecurityOptions') or [])}")
    problems = []
    if settings.oci_runtime is not None and settings.oci_runtime not in runtimes:
        line(f"  FAIL oci_runtime {settings.oci_runtime!r} is not installed in the engine")
        problems.append(
            f"oci_runtime {settings.oci_runtime!r} is not known to the engine; install it or unset "
            "CODOMYRMEX_SANDBOX_OCI_RUNTIME"
        )
    for warning in engine_warnings(settings, info, version):
        line(f"  WARN {warning}")
    return problems


USERNS_DEFAULT_RANGE = 65_536  # the size of the subuid range that userns-remap and rootless set up by default


def engine_warnings(settings: Settings, info: dict[str, Any], version: dict[str, Any]) -> list[str]:
    """Weak spots that do not stop the server but that an operator should know about."""
    warnings = []
    security = " ".join(info.get("SecurityOptions") or [])
    if settings.oci_runtime != "runsc":
        having = (
            'is installed: set oci_runtime = "runsc"'
            if "runsc" in (info.get("Runtimes") or {})
            else "is not installed; it would put a kernel of its own between the sandboxes and the host's"
        )
        warnings.append(
            f"sandboxes share the host kernel (runc); a kernel exploit escapes them. gVisor (runsc) {having}"
        )
    last_uid = settings.sandbox_uid_base + settings.sandbox_uid_count - 1
    if "name=userns" not in security and "name=rootless" not in security:
        warnings.append(
            "the engine uses no user namespaces (neither userns-remap nor rootless); each sandbox's uid "
            f"(one of {settings.sandbox_uid_base}-{last_uid}) is then the same uid on the host for the kernel"
        )
    elif last_uid >= USERNS_DEFAULT_RANGE:
        warnings.append(
            f"the engine remaps user namespaces, which map only the uids its subuid range holds (often "
            f"{USERNS_DEFAULT_RANGE}); sandbox uids go up to {last_uid} and may not start: set "
            "sandbox_uid_base and sandbox_uid_count inside the mapped range"
        )
    runc = next((c for c in version.get("Components") or [] if c.get("Name") == "runc"), None)
    if runc is not None and _older_than(str(runc.get("Version", "")), (1, 1, 12)):
        warnings.append(
            f"runc {runc.get('Version')} is older than 1.1.12, which fixed a container escape "
            "(CVE-2024-21626, 'Leaky Vessels'); upgrade runc unless your distribution backported the fix"
        )
    if settings.policy().network != "none" or any(
        settings.policy(language).network != "none" for language in settings.language_limits
    ):
        warnings.append('some sandboxes have outbound network access (network = "egress")')
    return warnings


def _older_than(version: str, minimum: tuple[int, ...]) -> bool:
    numbers = []
    for part in version.split("+", maxsplit=1)[0].split("-", maxsplit=1)[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return bool(numbers) and tuple(numbers) < minimum


def _version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

"""Building the runtime images (`codomyrmex-sandbox runtimes build`).

Each recipe builds ``FROM debian:bookworm-slim``. Where that base is not on the engine, it is
pulled; where no registry answers (an air-gapped host), it is bootstrapped locally with
``debootstrap --variant=minbase`` and imported, so the same recipes serve both kinds of host.
After a build, the image's version command runs in a locked-down container and its answer is
stored as an image label, which the server reports as ``runtime`` in every result. Every engine
call goes through `engine.Engine`, so its errors arrive already translated.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codomyrmex_sandbox.backends.docker.engine import Engine, connect
from codomyrmex_sandbox.errors import BackendError, ConfigurationError, RuntimeUnavailableError, SandboxError
from codomyrmex_sandbox.runtimes import LABEL_PREFIX, VERSION_LABEL, RuntimeSpec
from codomyrmex_sandbox.settings import Settings

BASE_REPOSITORY = "debian"
BASE_TAG = "bookworm-slim"
BASE_IMAGE = f"{BASE_REPOSITORY}:{BASE_TAG}"
Report = Callable[[str], None]


def build_runtimes(
    settings: Settings,
    runtimes: dict[str, RuntimeSpec],
    report: Report,
    *,
    force: bool = False,
    offline: bool = False,
    prune: bool = False,
) -> dict[str, str]:
    """Build every runtime image that is missing (all of them with ``force``); returns name -> version.

    With ``prune``, images that earlier recipes of these runtimes built are untagged afterwards.
    Not the default: another checkout of the project on the same engine may still use them.
    """
    engine = connect(settings)
    try:
        ensure_base_image(engine, report, offline=offline)
        versions = {name: _build_one(engine, settings, spec, report, force=force) for name, spec in runtimes.items()}
        for spec in runtimes.values() if prune else ():
            _remove_stale(engine, settings, spec, report)
    finally:
        engine.close()
    return versions


def ensure_base_image(engine: Engine, report: Report, *, offline: bool = False) -> None:
    """Make sure ``debian:bookworm-slim`` is on the engine: present, pulled, or bootstrapped."""
    if engine.image_labels(BASE_IMAGE) is not None:
        report(f"base image {BASE_IMAGE}: present")
        return
    if not offline:
        report(f"base image {BASE_IMAGE}: pulling")
        try:
            engine.pull(BASE_REPOSITORY, BASE_TAG)
        except SandboxError as exc:
            report(f"base image {BASE_IMAGE}: pull failed ({_first_line(exc)}); bootstrapping it locally")
        else:
            return
    bootstrap_base_image(engine, report)


def bootstrap_base_image(engine: Engine, report: Report) -> None:
    """debootstrap a minimal Debian bookworm and import it as the base image."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ConfigurationError(
            f"no registry answered and `debootstrap` is not installed, so {BASE_IMAGE} cannot be made; "
            "install it (`sudo apt-get install debootstrap`) and run "
            "`codomyrmex-sandbox runtimes build` again."
        )
    with tempfile.TemporaryDirectory(prefix="codomyrmex-base-") as tmp:
        root = Path(tmp) / "rootfs"
        report(f"base image {BASE_IMAGE}: debootstrap --variant=minbase bookworm (about a minute)")
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell, no user input
            [debootstrap, "--variant=minbase", "bookworm", str(root)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigurationError(
                f"debootstrap failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}; "
                "it needs root and access to a Debian mirror."
            )
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        report(f"base image {BASE_IMAGE}: importing")
        engine.import_image(
            str(archive),
            repository=BASE_REPOSITORY,
            tag=BASE_TAG,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                'CMD ["bash"]',
            ],
        )


def _build_one(engine: Engine, settings: Settings, spec: RuntimeSpec, report: Report, *, force: bool) -> str:
    image = spec.image(settings.image_prefix)
    labels = None if force else engine.image_labels(image)
    if labels is not None:
        version = str(labels.get(VERSION_LABEL, spec.name))
        report(f"{spec.name}: {image} is up to date ({version})")
        return version
    stage = f"{settings.image_prefix}-{spec.name}:build-{spec.digest}"
    report(f"{spec.name}: building {image}")
    # The context is the runtimes folder, so that every recipe can copy the shared files.
    events = engine.build(
        path=str(spec.directory.parent), dockerfile=f"{spec.name}/Dockerfile", tag=stage, forcerm=True
    )
    for event in events:
        _report_build_event(spec.name, event, report)
    version = _ask_version(engine, stage, spec)
    labelled = f'FROM {stage}\nLABEL {VERSION_LABEL}="{version}" {LABEL_PREFIX}.runtime="{spec.name}"\n'
    for event in engine.build(fileobj=io.BytesIO(labelled.encode()), tag=image):
        _report_build_event(spec.name, event, report)
    engine.remove_image(stage, noprune=True)
    report(f"{spec.name}: built {image} ({version})")
    return version


def _remove_stale(engine: Engine, settings: Settings, spec: RuntimeSpec, report: Report) -> None:
    """Untag images an earlier recipe of this runtime built (each can be a gigabyte); the engine frees
    their layers once nothing uses them. An image a running container uses stays until it ends."""
    current = spec.image(settings.image_prefix)
    repository = current.rsplit(":", 1)[0]
    for tag in engine.image_tags(repository):
        if tag != current and tag.startswith(f"{repository}:"):
            try:
                engine.remove_image(tag, noprune=False)
            except (BackendError, RuntimeUnavailableError) as exc:  # in use (or gone): the next build tries again
                report(f"{spec.name}: kept stale image {tag} ({_first_line(exc)})")
            else:
                report(f"{spec.name}: removed stale image {tag}")


def _report_build_event(name: str, event: dict[str, Any], report: Report) -> None:
    if "error" in event:
        raise BackendError(f"building the {name} image failed: {str(event['error']).strip()}")
    line = str(event.get("stream", "")).strip()
    if line.startswith("Step "):
        report(f"{name}: {line}")


def _ask_version(engine: Engine, image: str, spec: RuntimeSpec) -> str:
    out = engine.run(
        image,
        spec.version_command,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        read_only=True,
        tmpfs={"/tmp": "size=16m"},  # noqa: S108 - inside the container
        user="65534:65534",
    )
    version = out.decode().strip().splitlines()
    if not version:
        raise BackendError(f"the {spec.name} image did not print a version")
    return version[0][:100].replace('"', "")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__

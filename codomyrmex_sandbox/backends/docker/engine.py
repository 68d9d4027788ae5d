"""The Docker engine, as the rest of the backend sees it: blocking calls that raise only this package's errors.

This is the only module that imports docker-py or requests. docker-py is synchronous: every method
here blocks, and the backend runs each one in a worker thread. Every engine error is translated
here, in `_engine_errors`, and nowhere else:

- the engine cannot be reached at all (`connect`) -> `EngineUnavailableError`;
- the engine went away under a call (the socket closed or refused) -> `EngineLostError`, an
  `EngineUnavailableError` that tells the backend to drop its client and reconnect;
- an image that is not on the engine -> `RuntimeUnavailableError`;
- any other engine failure -> `BackendError`.

A few answers are not errors for the caller and are handled where they happen: a container that
is already gone (404) when it is killed or removed, one already stopped (409) when it is killed,
a removal already in progress (409), and a name in use (409) when a container is created (see
`identity.py`: the name carries the sandbox's uid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import docker
import docker.errors
import requests.exceptions

from codomyrmex_sandbox.backends.docker.attach import Attachment
from codomyrmex_sandbox.backends.docker.spec import ContainerSpec
from codomyrmex_sandbox.errors import BackendError, EngineUnavailableError, RuntimeUnavailableError, SandboxError
from codomyrmex_sandbox.settings import Settings

FIX_ENGINE = (
    "start the Docker engine (for example `sudo systemctl start docker`, or `sudo dockerd &`), "
    "or point CODOMYRMEX_SANDBOX_DOCKER_HOST at it"
)
FIX_IMAGES = "run `codomyrmex-sandbox runtimes build`"
NOT_FOUND = 404
CONFLICT = 409


class EngineLostError(EngineUnavailableError):
    """A call found the engine gone: the backend drops its client and reconnects."""


def connect(settings: Settings) -> Engine:
    """A client for the configured engine, checked with a ping."""
    try:
        if settings.docker_host:
            client = docker.DockerClient(base_url=settings.docker_host, max_pool_size=64)
        else:
            client = docker.DockerClient.from_env(max_pool_size=64)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise EngineUnavailableError(f"the Docker engine is not reachable ({exc}); {FIX_ENGINE}.") from exc
    return Engine(client)


@contextlib.contextmanager
def _engine_errors(image: str | None = None) -> Iterator[None]:
    """Translate what docker-py, requests and the socket raise into this package's errors."""
    try:
        yield
    except SandboxError:
        raise
    except docker.errors.ImageNotFound as exc:
        what = f"the runtime image {image}" if image else f"an image ({exc.explanation})"
        raise RuntimeUnavailableError(f"{what} is missing; {FIX_IMAGES}.") from exc
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise EngineLostError(f"lost the Docker engine ({exc}); {FIX_ENGINE}.") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise BackendError(f"the Docker engine failed: {exc}") from exc


def _status(exc: docker.errors.APIError) -> int | None:
    return exc.status_code


class Engine:
    """One connection to the engine. Blocking: call each method from a worker thread."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._api = client.api

    def close(self) -> None:
        with _engine_errors():
            self._client.close()

    def info(self) -> dict[str, Any]:
        with _engine_errors():
            return dict(self._client.info())

    def ping(self) -> None:
        with _engine_errors():
            self._api.ping()

    def version(self) -> dict[str, Any]:
        with _engine_errors():
            return dict(self._client.version())

    # -- sandboxes -------------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str | None:
        """Create a container; its id, or None when its name is in use by a live one (409)."""
        with _engine_errors(spec.image):
            try:
                created = self._api.create_container(
                    image=spec.image,
                    command=list(spec.command),
                    user=spec.user,
                    name=spec.name,
                    stdin_open=spec.stdin_open,
                    tty=spec.tty,
                    environment=dict(spec.environment),
                    working_dir=spec.working_dir,
                    hostname=spec.hostname,
                    network_disabled=spec.network_disabled,
                    labels=dict(spec.labels),
                    host_config=dict(spec.host_config),
                )
            except docker.errors.APIError as exc:
                if _status(exc) == CONFLICT:
                    return None
                raise
            return str(created["Id"])

    def attach(self, cid: str) -> Attachment:
        """The container's stdin, stdout and stderr as one hijacked stream; attach before the start."""
        with _engine_errors():
            stream = self._api.attach_socket(cid, {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        return Attachment(stream)

    def start(self, cid: str) -> None:
        with _engine_errors():
            self._api.start(cid)

    def wait_for_exit(self, cid: str) -> int | None:
        """Block until the container next stops (or is removed); its exit code, as the engine reports it."""
        with _engine_errors():
            answer = self._api.wait(cid, timeout=None, condition="next-exit")
        code = answer.get("StatusCode")
        return None if code is None else int(code)

    def set_memory(self, cid: str, limit_bytes: int) -> None:
        """Change a running container's memory limit in place (swap stays equal: none)."""
        with _engine_errors():
            self._api.update_container(cid, mem_limit=limit_bytes, memswap_limit=limit_bytes)

    def kill(self, cid: str) -> None:
        """SIGKILL the container's init, so every process in it; one already gone or stopped is fine."""
        with _engine_errors():
            try:
                self._api.kill(cid)
            except docker.errors.APIError as exc:
                if _status(exc) not in (NOT_FOUND, CONFLICT):
                    raise

    def remove(self, cid: str) -> bool:
        """Force-remove a container (killing what runs in it); False when it was gone or already being removed."""
        with _engine_errors():
            try:
                self._api.remove_container(cid, force=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if _status(exc) != CONFLICT:  # removal already in progress
                    raise
                return False
            return True

    def oom_killed(self, cid: str) -> bool | None:
        """The engine's OOM flag for a container; None once it was removed (the engine forgot it)."""
        with _engine_errors():
            try:
                state = self._api.inspect_container(cid)["State"]
            except docker.errors.NotFound:
                return None
            return bool(state["OOMKilled"])

    def containers(self, label: str) -> list[tuple[str, dict[str, str]]]:
        """Every container (running or not) that carries ``label``: its id and labels."""
        with _engine_errors():
            summaries = self._api.containers(all=True, filters={"label": label})
        return [(str(summary["Id"]), dict(summary.get("Labels") or {})) for summary in summaries]

    def ensure_network(self, name: str, *, options: Mapping[str, str], labels: Mapping[str, str]) -> None:
        """Create an IPv4 bridge network with these driver options, unless one of that name exists."""
        with _engine_errors():
            try:
                self._client.networks.get(name)
            except docker.errors.NotFound:
                self._client.networks.create(
                    name,
                    driver="bridge",
                    internal=False,
                    enable_ipv6=False,
                    options=dict(options),
                    labels=dict(labels),
                )

    # -- images ----------------------------------------------------------------------------

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The labels of a local image; None when the engine does not have it (never pulls)."""
        with _engine_errors(image):
            try:
                info = self._api.inspect_image(image)  # type: ignore[no-untyped-call]
            except docker.errors.ImageNotFound:
                return None
        return dict((info.get("Config") or {}).get("Labels") or {})

    def pull(self, repository: str, tag: str) -> None:
        with _engine_errors():
            self._client.images.pull(repository, tag=tag)

    def import_image(self, archive: str, *, repository: str, tag: str, changes: Sequence[str]) -> None:
        """Import a root filesystem tarball as an image."""
        with _engine_errors():
            self._api.import_image(src=archive, repository=repository, tag=tag, changes=list(changes))

    def build(self, **arguments: Any) -> Iterator[dict[str, Any]]:  # noqa: ANN401 - the engine's build options
        """Build an image without pulling; the engine's progress events, decoded, as they come."""
        with _engine_errors():
            yield from self._api.build(rm=True, pull=False, decode=True, **arguments)

    def remove_image(self, image: str, *, noprune: bool) -> None:
        with _engine_errors(image):
            self._api.remove_image(image, noprune=noprune)

    def image_tags(self, repository: str) -> list[str]:
        """Every tag of every local image of ``repository``."""
        with _engine_errors():
            return [tag for image in self._client.images.list(name=repository) for tag in image.tags]

    def run(self, image: str, command: Sequence[str], **options: Any) -> bytes:  # noqa: ANN401 - the engine's options
        """Run a container to its end and remove it; its output. Options as docker-py's ``containers.run``."""
        with _engine_errors(image):
            out = self._client.containers.run(image, list(command), remove=True, **options)
        return out if isinstance(out, bytes) else str(out).encode()

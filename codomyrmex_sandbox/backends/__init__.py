"""Isolation backends, chosen by name and imported lazily (docker-py loads only when used)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from codomyrmex_sandbox.backends.base import Backend, Job, RuntimeStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from codomyrmex_sandbox.runtimes import RuntimeSpec
    from codomyrmex_sandbox.settings import LimitPolicy, Settings

__all__ = ["Backend", "Job", "RuntimeStatus", "create_backend"]

_BACKENDS = {"docker": ("codomyrmex_sandbox.backends.docker", "DockerBackend")}


def create_backend(
    settings: Settings, runtimes: dict[str, RuntimeSpec], policies: Mapping[str, LimitPolicy]
) -> Backend:
    """The backend the settings name, handed each language's policy as the `Sandbox` resolved it.

    A backend never resolves a policy itself: it prepares its sandboxes (a warm pool) for the
    defaults in ``policies`` and sizes their deadlines by its caps. ``backend = "fake"`` builds a
    `FakeBackend` with its default handler; tests build one with a handler of their own.
    """
    if settings.backend == "fake":
        from codomyrmex_sandbox.backends.fake import FakeBackend  # noqa: PLC0415 - lazy by design

        return FakeBackend()
    module_name, class_name = _BACKENDS[settings.backend]
    backend_cls = getattr(import_module(module_name), class_name)
    backend: Backend = backend_cls(settings, runtimes, policies)
    return backend

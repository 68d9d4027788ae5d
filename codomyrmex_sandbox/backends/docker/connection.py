"""The engine as the backend's async code uses it: blocking calls in worker threads, a lost engine noticed.

docker-py is synchronous, so every engine call runs in a worker thread (at most 256 at once). A call
that finds the engine gone (`EngineLostError`) drops it: later calls fail at once with an
`EngineUnavailableError` that says how to start the engine, and `lost` wakes the upkeep that
reconnects (see `DockerBackend._connected`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from codomyrmex_sandbox.backends.docker.engine import FIX_ENGINE, Engine, EngineLostError
from codomyrmex_sandbox.errors import EngineUnavailableError
from codomyrmex_sandbox.logs import get_logger

T = TypeVar("T")
LOGGER = "codomyrmex_sandbox.docker"
MAX_THREADS = 256


class EngineConnection:
    """The connected engine, or None while it is away. See the module docstring."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.lost = anyio.Event()  # set when a call finds the engine gone: upkeep starts reconnecting
        self._threads = anyio.CapacityLimiter(MAX_THREADS)

    def connected(self, engine: Engine) -> None:
        """From now on, calls go to ``engine``."""
        self.engine = engine
        self.lost = anyio.Event()

    def disconnect(self) -> Engine | None:
        """Forget the engine (to close it); the one there was, if any."""
        engine, self.engine = self.engine, None
        return engine

    def require(self) -> Engine:
        if self.engine is None:
            raise EngineUnavailableError(f"the Docker engine is not connected; {FIX_ENGINE}.")
        return self.engine

    async def thread(self, func: Callable[[], None], *, abandon: bool = False) -> None:
        """Run blocking work that is not an engine call (a socket's reader or writer) in a worker thread.

        ``abandon``: when the task is cancelled, return at once and let the thread end by itself (a
        session's reader, which ends when its sandbox's stream is hung up, whenever that is).
        """
        await anyio.to_thread.run_sync(func, limiter=self._threads, abandon_on_cancel=abandon)

    async def call(self, func: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """Run one blocking call in a worker thread; one that finds the engine gone drops the engine."""
        try:
            return await anyio.to_thread.run_sync(partial(func, *args), limiter=self._threads)
        except EngineLostError as exc:
            if self.engine is not None:
                get_logger(LOGGER).warning("engine_lost", error=str(exc.__cause__ or exc))
            self.engine = None
            self.lost.set()
            raise

    async def use(self, operation: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """Run ``operation(engine, *args)`` on the connected engine in a worker thread (see `call`)."""
        return await self.call(lambda: operation(self.require(), *args))

"""Sessions: which are open, whose they are, and when they end.

A session is one sandbox with one long-lived interpreter (`backends.base.BackendSession`); this
module keeps the server's view of them: the owner (the client that created it: a stdio connection,
an HTTP principal, a Python API `Sandbox`), its limits, its call count, and its two clocks: the idle
timeout (from its last call's end) and the hard end (from its creation). `SessionRegistry.run`
ends each session when one of them passes, removing its sandbox; the `Sandbox` ends them all when
it closes.

Ids are 256 random bits. A session is found only by its owner: another client's id, a made-up one
and one that ended long ago all get the same answer (`SessionNotFoundError`, "no open session with
that id"); only the owner of a session that ended recently is told why it ended, so that a model
does not keep calling variables that died with a timeout. Calls of one session run one at a time,
in arrival order (`Session.lock`, which is FIFO).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio

from codomyrmex_sandbox.backends.base import BackendSession
from codomyrmex_sandbox.errors import SessionLimitError, SessionNotFoundError
from codomyrmex_sandbox.models import Limits, ResourceUsage, SessionSummary

SESSION_ID_PREFIX = "s_"
# Why a session ended, beyond what a call reports (`models.EndedReason`): its owner closed it, it was
# idle or reached its hard end, the server stopped, a call was cancelled, or it could not open.
ServerEndReason = str
ENDED_KEPT = 4096  # how many ended sessions' reasons are remembered for their owners


def new_session_id() -> str:
    """256 random bits, URL-safe: unguessable, and safe in a log line or a URI."""
    return SESSION_ID_PREFIX + secrets.token_urlsafe(32)


@dataclass
class Session:
    """One open session, as the server tracks it."""

    session_id: str
    owner: str
    client: str | None  # the client's name and version, for audit records
    language: str
    limits: Limits
    idle_timeout: float
    backend: BackendSession
    created: float = field(default_factory=time.monotonic)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    lifetime: float = 0.0
    principal: str | None = None  # the HTTP principal that created it, for audit records
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    running: bool = False  # a call is running: the idle clock stands still
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    cpu_time_ms: float = 0.0  # the calls' CPU time so far, where accounting works
    peak_memory_bytes: int | None = None

    @property
    def expires(self) -> float:
        """The hard end, on the monotonic clock."""
        return self.created + self.lifetime

    @property
    def idle_expires(self) -> float:
        return math.inf if self.running else self.last_used + self.idle_timeout

    @property
    def expires_at(self) -> datetime:
        return self.created_at + timedelta(seconds=self.lifetime)

    def idle_expires_at(self) -> datetime:
        remaining = max(0.0, self.last_used + self.idle_timeout - time.monotonic())
        if self.running:
            remaining = self.idle_timeout
        return min(datetime.now(UTC) + timedelta(seconds=remaining), self.expires_at)

    def remaining(self) -> float:
        """Seconds until the hard end."""
        return self.expires - time.monotonic()

    def summary(self) -> SessionSummary:
        return SessionSummary(
            session_id=self.session_id,
            language=self.language,
            calls=self.calls,
            idle_expires_at=self.idle_expires_at(),
            expires_at=self.expires_at,
        )

    def add_usage(self, usage: ResourceUsage | None) -> None:
        if usage is None:
            return
        if usage.cpu_time_ms is not None:
            self.cpu_time_ms += usage.cpu_time_ms
        if usage.peak_memory_bytes is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, usage.peak_memory_bytes)


class SessionRegistry:
    """The open sessions, by id; the counts the limits apply to; the clocks that end them."""

    def __init__(self, max_sessions: int, max_per_client: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self._open: dict[str, Session] = {}
        self._reserved: dict[str, int] = {}  # per owner: sessions being created
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (owner, why), for owners
        self._changed = anyio.Event()

    def __len__(self) -> int:
        return len(self._open)

    def sessions(self) -> list[Session]:
        return list(self._open.values())

    def owned_by(self, owner: str) -> list[Session]:
        return sorted((s for s in self._open.values() if s.owner == owner), key=lambda s: s.created)

    def reserve(self, owner: str) -> None:
        """Take a place for a session ``owner`` is creating, or raise SessionLimitError naming the limit."""
        total = len(self._open) + sum(self._reserved.values())
        mine = len(self.owned_by(owner)) + self._reserved.get(owner, 0)
        if self.max_sessions == 0:
            raise SessionLimitError(
                "sessions are turned off on this server (max_sessions = 0); call execute_code without session_id."
            )
        if mine >= self.max_per_client:
            raise SessionLimitError(
                f"this client has {mine} open sessions, the limit (max_sessions_per_client); close one with "
                "close_session (list_sessions shows them) and try again."
            )
        if total >= self.max_sessions:
            raise SessionLimitError(
                f"the server has {total} open sessions, its limit (max_sessions); close one of yours with "
                "close_session, or try again later."
            )
        self._reserved[owner] = self._reserved.get(owner, 0) + 1

    def release(self, owner: str) -> None:
        """The reservation is over (the session opened, or failed to)."""
        left = self._reserved.get(owner, 0) - 1
        if left > 0:
            self._reserved[owner] = left
        else:
            self._reserved.pop(owner, None)

    def add(self, session: Session) -> None:
        self._open[session.session_id] = session
        self._wake()

    def is_open(self, session_id: str) -> bool:
        return session_id in self._open

    def get(self, session_id: str, owner: str) -> Session:
        """``owner``'s open session ``session_id``, or SessionNotFoundError (the same for every
        id that is not one of theirs, except their own ended ones, which say why)."""
        session = self._open.get(session_id)
        if session is not None and session.owner == owner and session.backend.alive:
            return session
        ended = self._ended.get(session_id)
        if ended is not None and ended[0] == owner:
            raise SessionNotFoundError(
                f"session {session_id} has ended ({ended[1]}); its state is gone. Create a new one with "
                "create_session (and load what it needs again), or call execute_code without session_id."
            )
        raise SessionNotFoundError(
            f"no open session with id {session_id[:80]!r} for this client; create one with create_session, or "
            "call execute_code without session_id. list_sessions shows this client's open sessions. Over stdio a "
            "session ends with the MCP connection that created it (a client that starts a server per call cannot "
            "keep one); over HTTP it belongs to the token's principal, on the server that created it."
        )

    def remove(self, session: Session, why: str) -> bool:
        """Forget an open session, remembering why it ended for its owner; False if it was gone already."""
        if self._open.pop(session.session_id, None) is None:
            return False
        self._ended[session.session_id] = (session.owner, why)
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        self._wake()
        return True

    def touched(self) -> None:
        """A session's clocks changed (a call started or ended): the upkeep looks again."""
        self._wake()

    def due(self, now: float) -> list[tuple[Session, str]]:
        """The sessions whose idle time or lifetime has passed, with the reason."""
        out = []
        for session in self._open.values():
            if now >= session.expires:
                out.append((session, "lifetime"))
            elif now >= session.idle_expires:
                out.append((session, "idle"))
        return out

    def next_due(self) -> float:
        """The next deadline of a session that may be ended now: one whose lock is held (a call runs
        or is about to) is looked at again when the lock is released (`touched`)."""
        return min(
            (min(s.expires, s.idle_expires) for s in self._open.values() if not s.lock.locked()), default=math.inf
        )

    async def wait_for_change(self, until: float) -> None:
        """Until the next deadline (monotonic) or a change, whichever comes first."""
        changed = self._changed
        with anyio.move_on_after(max(0.0, until - time.monotonic())):
            await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

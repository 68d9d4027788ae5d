"""Per-sandbox identities: every live sandbox runs as a uid (and gid) of its own.

The kernel keeps several quotas per user, not per container: inotify instances and watches,
pending signals (``RLIMIT_SIGPENDING``, shown as ``SigQ`` in ``/proc/self/status``), POSIX message
queue bytes, processes (``RLIMIT_NPROC``). Sandboxes that share a uid in the initial user namespace
share those counters, so one sandbox could exhaust them for another and watch another's use of them:
a denial of service and a covert channel without any escape. A uid per sandbox makes each of those
counters per sandbox.

Uids are drawn at random from an operator-set range (``sandbox_uid_base``, ``sandbox_uid_count``,
far above the host's own users by default) and are unique among live sandboxes on the engine, not
just within one server: the container's name carries its uid, and the engine refuses a second
container with the same name, so two servers on one host can never hand out the same uid at once.
A name (and so the uid) is free again once the engine removed the container, when nothing of the
sandbox is left running.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

NAME_PREFIX = "codomyrmex-sandbox-u"
MAX_ATTEMPTS = 16  # collisions are rare in a large range; a full range is an operator error


@dataclass(frozen=True)
class UidRange:
    """The uids sandboxes may run as: ``base`` up to ``base + count - 1``."""

    base: int
    count: int

    def candidates(self, taken: set[int]) -> Iterator[int]:
        """Random uids from the range that this server does not hold; at most `MAX_ATTEMPTS` of them.

        ``taken`` spares a round trip for uids this server knows to be in use; uniqueness against
        other servers is the engine's (see `container_name`).
        """
        for _ in range(MAX_ATTEMPTS):
            uid = self.base + secrets.randbelow(self.count)
            if uid not in taken:
                yield uid


def container_name(uid: int) -> str:
    """The engine-wide unique name of the sandbox that runs as ``uid``."""
    return f"{NAME_PREFIX}{uid}"

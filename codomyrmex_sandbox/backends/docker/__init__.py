"""The Docker backend: one fresh, locked-down container per execution, used once.

Life of one execution: take a warm container from the pool (created, attached and started ahead
of demand, its runner waiting for code), or create one (never pulling an image); send the
runner's header, the code and stdin on its stdin; read its output until the runner reports the
program's end on both streams, the streams end, the deadline passes, or a stream passes the cap.
The last two, or a cancelled call, kill the container: every process in it dies with it. The
status comes from evidence: the runner's report of a deliberate exit, the kernel's OOM count for
the container (or the engine's record of exit code and OOM flag when the runner could not
report). The container is always removed, off the caller's clock once the result is decided.

One module per concern:

- `backend`: `DockerBackend`, the orchestration: lifecycle, one execution, upkeep (warm pool
  refills, janitor, reaper), reconnecting to an engine that went away;
- `spec`: the container, every hardening option, as plain data (a pure function);
- `engine`: the only importer of docker-py and requests; every engine error translated there;
- `connection`: engine calls in worker threads, and an engine that went away noticed;
- `execution`: one run in a started sandbox: hand-over, output, deadline, cap, kill, evidence;
- `attach`: the hijacked attach socket: hand-over, output frames, hang-up, liveness;
- `labels`: the labels every container carries, and the sweep of containers left behind;
- `evidence`: the kernel's counters folded into the evidence (OOM kills, the memory limit hit);
- `identity`: a uid of its own for every live sandbox; `pool`: the warm pool;
  `cgroups`: resource accounting; `egress`: the egress network mode; `images`: building the
  runtime images.
"""

from __future__ import annotations

from codomyrmex_sandbox.backends.docker.backend import DockerBackend
from codomyrmex_sandbox.backends.docker.engine import connect
from codomyrmex_sandbox.backends.docker.labels import (
    LABEL_CREATED,
    LABEL_EXECUTION,
    LABEL_EXPIRES,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_PID,
    LABEL_UID,
    MANAGED,
)

__all__ = [
    "LABEL_CREATED",
    "LABEL_EXECUTION",
    "LABEL_EXPIRES",
    "LABEL_HOST",
    "LABEL_INSTANCE",
    "LABEL_PID",
    "LABEL_UID",
    "MANAGED",
    "DockerBackend",
    "connect",
]

"""Who a call comes from, over HTTP: a principal.

A principal is what authenticated the request: the NAME of a bearer token from `auth_tokens_file`,
the ``sub`` of a JWT (per issuer), or ``anonymous`` on a loopback server started with
``--insecure-no-auth``. Audit records name it; it owns its sessions and has its own share of the
execution slots. Its ``key`` keeps kinds and issuers apart: a JWT whose ``sub`` is ``alice`` is
not the token named ``alice``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrincipalKind = Literal["token", "jwt", "anonymous"]


@dataclass(frozen=True)
class Principal:
    name: str  # what audit records and logs show
    kind: PrincipalKind
    issuer: str | None = None  # a JWT's iss

    @property
    def key(self) -> str:
        """Unique across kinds and issuers: the owner of this principal's sessions."""
        if self.kind == "jwt":
            return f"jwt:{self.issuer}:{self.name}"
        return f"{self.kind}:{self.name}"


ANONYMOUS = Principal("anonymous", "anonymous")

# Where the HTTP app puts the request's principal in the ASGI scope, for the MCP adapter to read.
SCOPE_KEY = "codomyrmex_sandbox.principal"

"""Bearer authentication for the HTTP transport: who a request comes from (`Principal`).

Two kinds of bearer token are accepted, each optional:

- **Tokens from `auth_tokens_file`**: lines ``NAME SHA256HEX``. Only the SHA-256 of a token is on
  disk; a presented token is hashed and compared with every line in constant time (no early exit,
  `hmac.compare_digest`), and the NAME of the line it matches is the principal. The file is read
  again when it changes (a new line takes effect without a restart; a broken file keeps the last
  good one, and says so on stderr).
- **JWTs** from an issuer (`auth_jwt_issuer`, `auth_jwt_audience`, `auth_jwks_url`), checked with
  PyJWT against the issuer's JWKS: an asymmetric signature by a key of the set (never ``none``, never
  an HMAC secret), ``exp`` (required), ``nbf`` (when present), ``iss`` and ``aud``; ``sub`` is the
  principal. The key set is cached for 5 minutes and fetched again for an unknown ``kid`` at most
  every 30 seconds, so forged ``kid`` values cannot make the server hammer the issuer.

`Authenticator` is the MCP SDK's `TokenVerifier`: the SDK's `BearerAuthBackend` and
`RequireAuthMiddleware` (the 401 with ``WWW-Authenticate: Bearer ... resource_metadata=...``) use it.
No token, and no part of one, is ever logged: a refusal is logged with its reason only.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import jwt
from mcp.server.auth.provider import AccessToken

from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.principals import Principal
from codomyrmex_sandbox.settings import Settings
from codomyrmex_sandbox.tokens import (
    LOGGER,
    NAME_PATTERN,
    TOKEN_PREFIX,
    TokenFile,
    new_token,
    parse_tokens_file,
    token_digest,
)

__all__ = [
    "NAME_PATTERN",
    "TOKEN_PREFIX",
    "Authenticator",
    "JwtVerifier",
    "PrincipalToken",
    "TokenFile",
    "check_jwks_url",
    "is_loopback",
    "new_token",
    "parse_tokens_file",
    "token_digest",
]

# Asymmetric algorithms only: a JWKS publishes public keys, and HMAC with a public key as the secret
# is the classic confusion attack.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWT_LEEWAY_SECONDS = 30  # clock skew allowed on exp and nbf
JWKS_LIFESPAN_SECONDS = 300
JWKS_REFRESH_SECONDS = 30  # at most one fetch per this long for an unknown kid
JWKS_TIMEOUT_SECONDS = 5
MAX_SUB_CHARS = 256


class PrincipalToken(AccessToken):
    """An `AccessToken` that carries its principal. It never holds the token itself."""

    principal: Principal


class JwtVerifier:
    def __init__(self, issuer: str, audience: str, jwks_url: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self._jwks = jwt.PyJWKClient(
            jwks_url, cache_keys=False, cache_jwk_set=True, lifespan=JWKS_LIFESPAN_SECONDS, timeout=JWKS_TIMEOUT_SECONDS
        )
        self._fetched = -float("inf")
        self._lock = anyio.Lock()

    async def verify(self, token: str) -> tuple[Principal, int] | None:
        """The token's principal and expiry, or None (the reason is logged, the token never)."""
        try:
            return await self._verify(token)
        except _RefusedError as exc:
            get_logger(LOGGER).info("jwt_refused", reason=str(exc))
            return None

    async def _verify(self, token: str) -> tuple[Principal, int]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _RefusedError("not a JWT") from exc
        algorithm = header.get("alg")
        if algorithm not in JWT_ALGORITHMS:
            raise _RefusedError(f"algorithm {str(algorithm)[:20]!r} not allowed")
        key = await self._key(header.get("kid"))
        if key is None:
            raise _RefusedError("no key of the issuer's JWKS matches the token's kid")
        declared = key._jwk_data.get("alg")  # noqa: SLF001 - the JWK's own alg, when it names one
        if declared is not None and declared != algorithm:
            raise _RefusedError("the key's alg differs from the token's")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=JWT_LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise _RefusedError(type(exc).__name__) from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUB_CHARS:
            raise _RefusedError("sub is not a usable principal name")
        return Principal(subject, "jwt", self.issuer), int(claims["exp"])

    async def _key(self, kid: object) -> jwt.PyJWK | None:
        async with self._lock:  # one fetch at a time; the cached set answers at once
            keys = await self._key_set(refresh=False)
            key = _find(keys, kid)
            if key is None and time.monotonic() - self._fetched >= JWKS_REFRESH_SECONDS:
                keys = await self._key_set(refresh=True)
                key = _find(keys, kid)
            return key

    async def _key_set(self, *, refresh: bool) -> jwt.PyJWKSet | None:
        cache = self._jwks.jwk_set_cache
        if refresh or cache is None or cache.get() is None:  # this call fetches: the throttle counts it
            self._fetched = time.monotonic()
        try:
            return await anyio.to_thread.run_sync(self._jwks.get_jwk_set, refresh)
        except (jwt.PyJWTError, ValueError, OSError) as exc:  # unreachable, not JSON, no usable key
            get_logger(LOGGER).warning("jwks_unavailable", error=str(exc)[:300])
            return None


def _find(keys: jwt.PyJWKSet | None, kid: object) -> jwt.PyJWK | None:
    if keys is None:
        return None
    usable = [key for key in keys.keys if key.public_key_use in {None, "sig"} and key.key_type != "oct"]
    if kid is None:
        return usable[0] if len(usable) == 1 else None
    return next((key for key in usable if key.key_id == kid), None)


class _RefusedError(Exception):
    """A JWT that does not authenticate anyone; the message is the logged reason."""


@dataclass
class Authenticator:
    """The MCP SDK's `TokenVerifier` over a tokens file and a JWT issuer (either may be absent)."""

    tokens: TokenFile | None
    jwt: JwtVerifier | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        tokens = TokenFile(settings.auth_tokens_file) if settings.auth_tokens_file is not None else None
        verifier = None
        if settings.auth_jwks_url is not None:
            check_jwks_url(settings.auth_jwks_url)
            assert settings.auth_jwt_issuer is not None  # noqa: S101 - the settings require all three
            assert settings.auth_jwt_audience is not None  # noqa: S101
            verifier = JwtVerifier(settings.auth_jwt_issuer, settings.auth_jwt_audience, settings.auth_jwks_url)
        return cls(tokens, verifier)

    async def verify_token(self, token: str) -> AccessToken | None:
        token = token.strip()
        if not token:
            return None
        if self.tokens is not None:
            principal = self.tokens.lookup(token)
            if principal is not None:
                return PrincipalToken(token="", client_id=principal.key, scopes=[], principal=principal)
        if self.jwt is not None and token.count(".") == 2:  # noqa: PLR2004 - header.payload.signature
            verified = await self.jwt.verify(token)
            if verified is not None:
                principal, expires = verified
                return PrincipalToken(
                    token="",
                    client_id=principal.key,
                    scopes=[],
                    expires_at=expires + JWT_LEEWAY_SECONDS,
                    subject=principal.name,
                    principal=principal,
                )
        return None


def check_jwks_url(url: str) -> None:
    """https, or http to a loopback address (a JWKS fetched in clear text from elsewhere could be forged)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return
    raise ConfigurationError(
        f"auth_jwks_url must be an https URL (http only on a loopback address, for tests); got {url[:200]!r}"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

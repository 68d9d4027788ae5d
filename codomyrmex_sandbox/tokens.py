"""Bearer tokens of `auth_tokens_file`: making one, and recognising one in constant time.

Only the SHA-256 of a token is on disk, in lines ``NAME SHA256HEX`` (``#`` comments); NAME is the
principal. A presented token is hashed and compared with every line (`hmac.compare_digest`, no
early exit). Kept apart from `auth` (which imports the MCP SDK and PyJWT) so that
``codomyrmex-sandbox auth new-token`` answers at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.principals import Principal

TOKEN_PREFIX = "cmx_"  # noqa: S105 - a marker that makes leaked tokens easy to scan for, not a secret
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HEX = re.compile(r"[0-9a-f]{64}")
LOGGER = "codomyrmex_sandbox.auth"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token(name: str) -> tuple[str, str]:
    """A new random bearer token for principal ``name``, and the line that admits it."""
    if NAME_PATTERN.fullmatch(name) is None:
        raise ConfigurationError(
            f"a token name must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit; "
            f"not {name[:80]!r}"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, f"{name} {token_digest(token)}"


def parse_tokens_file(text: str, where: str) -> list[tuple[str, str]]:
    """The (name, sha256 hex) lines of a tokens file; ConfigurationError naming the line when one is wrong."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:  # noqa: PLR2004 - NAME and hash
            raise ConfigurationError(
                f"{where}, line {number}: expected 'NAME SHA256HEX' (two fields); make a line with "
                "`codomyrmex-sandbox auth new-token NAME`"
            )
        name, digest = fields[0], fields[1].lower()
        if NAME_PATTERN.fullmatch(name) is None:
            raise ConfigurationError(
                f"{where}, line {number}: {name[:80]!r} is not a valid name (letters, digits, '.', '_', '@', '-')"
            )
        if _HEX.fullmatch(digest) is None:
            raise ConfigurationError(
                f"{where}, line {number}: the second field must be the token's SHA-256 in hex (64 characters), "
                "never the token itself"
            )
        entries.append((name, digest))
    return entries


class TokenFile:
    """The tokens of `auth_tokens_file`, read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._broken: tuple[int, ...] | None = None  # the version that failed to parse, until it changes
        self._entries: list[tuple[str, str]] = []
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        stamp: tuple[int, ...] | None = None
        try:
            info = self.path.stat()
            # ctime too: no copy or touch can set it back, so every rewrite is seen
            stamp = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
            if stamp in {self._stamp, self._broken}:
                return
            entries = parse_tokens_file(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, ConfigurationError) as exc:
            if strict:
                if isinstance(exc, ConfigurationError):
                    raise
                raise ConfigurationError(f"cannot read auth_tokens_file {self.path}: {exc}") from exc
            if stamp is None or stamp != self._broken:  # once per broken version, not once per request
                get_logger(LOGGER).error(
                    "tokens_file_unreadable", path=str(self.path), error=str(exc), kept="last good"
                )
            self._broken = stamp
            return
        self._stamp = stamp
        self._entries = entries
        if not strict:
            get_logger(LOGGER).info("tokens_file_reloaded", path=str(self.path), tokens=len(entries))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        self._load(strict=False)
        digest = token_digest(token)
        found: str | None = None
        for name, expected in self._entries:  # every line, whichever matches: constant time
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return None if found is None else Principal(found, "token")

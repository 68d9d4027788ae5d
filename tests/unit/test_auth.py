"""Bearer authentication (tokens.py, auth.py): the tokens file, JWTs checked against a JWKS, and what a verified
request carries.

The JWKS is served by the test itself, on loopback, by a `http.server` thread that counts its
requests (`JwksServer`), so that the refresh throttle is measured on the issuer's side. The throttle's
clock is auth.py's own `time.monotonic`, replaced by a `Clock` the test moves by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from codomyrmex_sandbox import auth
from codomyrmex_sandbox.auth import (
    JWKS_REFRESH_SECONDS,
    JWT_LEEWAY_SECONDS,
    Authenticator,
    JwtVerifier,
    PrincipalToken,
    check_jwks_url,
    is_loopback,
)
from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.principals import Principal
from codomyrmex_sandbox.settings import Settings
from codomyrmex_sandbox.tokens import TokenFile, new_token, parse_tokens_file, token_digest

ISSUER = "https://issuer.example"
AUDIENCE = "codomyrmex-sandbox-tests"
WITHIN = 10.0  # seconds: the bound on anything that should take milliseconds
TOKEN_SHAPE = re.compile(r"cmx_[A-Za-z0-9_-]{43}")  # the prefix, then 32 random bytes in URL-safe base64


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rewrite(path: Path, text: str) -> None:
    """Replace the file's content and move its mtime on, so that the change is seen whatever the
    file system's timestamp granularity (a same-size rewrite within one tick would look unchanged)."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


# -- the tokens file -----------------------------------------------------------------------------


def test_a_tokens_file_skips_comments_and_blank_lines_and_reads_the_rest() -> None:
    alice, bob = "a" * 64, "B" * 64
    text = f"# operators: rotate quarterly\n\n   \nalice {alice}\n  # indented comment\n\tbob   {bob}  \n"
    assert parse_tokens_file(text, "tokens.txt") == [("alice", alice), ("bob", "b" * 64)]  # hex is lowered
    assert parse_tokens_file("", "tokens.txt") == []


@pytest.mark.parametrize(
    ("line", "says"),
    [
        pytest.param("alice", "expected 'NAME SHA256HEX' (two fields)", id="one field"),
        pytest.param(f"alice {'a' * 64} extra", "expected 'NAME SHA256HEX' (two fields)", id="three fields"),
        pytest.param(f"-alice {'a' * 64}", "is not a valid name", id="name starting with a dash"),
        pytest.param(f"al/ice {'a' * 64}", "is not a valid name", id="slash in the name"),
        pytest.param(f"{'n' * 65} {'a' * 64}", "is not a valid name", id="name too long"),
        pytest.param(f"alice {'a' * 63}", "the token's SHA-256 in hex", id="short hash"),
        pytest.param(f"alice {'g' * 64}", "the token's SHA-256 in hex", id="not hex"),
        pytest.param("alice cmx_" + "A" * 43, "never the token itself", id="the token instead of its hash"),
    ],
)
def test_a_wrong_line_is_refused_with_the_file_and_line_number(line: str, says: str) -> None:
    text = f"# header\nbob {'b' * 64}\n\n{line}\ncarol {'c' * 64}\n"
    with pytest.raises(ConfigurationError, match="line") as refused:
        parse_tokens_file(text, "/etc/cmx/tokens.txt")
    message = str(refused.value)
    assert message.startswith("/etc/cmx/tokens.txt, line 4: ")
    assert says in message
    assert "A" * 43 not in message  # a token pasted by mistake is not echoed back


def tokens_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_token_is_looked_up_by_its_hash_and_names_its_principal(tmp_path: Path) -> None:
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    tokens = TokenFile(tokens_file(tmp_path, "# two", alice_line, bob_line))
    assert len(tokens) == 2
    assert tokens.lookup(alice) == Principal("alice", "token")
    assert tokens.lookup(bob) == Principal("bob", "token")
    assert tokens.lookup(alice + "x") is None
    assert tokens.lookup(alice[:-1]) is None
    assert tokens.lookup("") is None
    assert tokens.lookup(digest(alice)) is None  # the hash itself is not a token


def test_two_lines_with_one_name_admit_both_tokens_as_that_principal(tmp_path: Path) -> None:
    """Rotation: the old and the new token of one principal, side by side."""
    old, old_line = new_token("alice")
    new, new_line = new_token("alice")
    tokens = TokenFile(tokens_file(tmp_path, old_line, new_line))
    assert tokens.lookup(old) == tokens.lookup(new) == Principal("alice", "token")


def test_one_hash_on_two_lines_names_the_first_principal_only(tmp_path: Path) -> None:
    token, _ = new_token("x")
    tokens = TokenFile(tokens_file(tmp_path, f"alice {digest(token)}", f"mallory {digest(token)}"))
    assert tokens.lookup(token) == Principal("alice", "token")


def test_a_missing_or_broken_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read auth_tokens_file"):
        TokenFile(tmp_path / "absent.txt")
    with pytest.raises(ConfigurationError, match="line 1"):
        TokenFile(tokens_file(tmp_path, "alice"))


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    path = tokens_file(tmp_path, alice_line)
    tokens = TokenFile(path)
    assert tokens.lookup(bob) is None
    with capture_logs() as logs:
        rewrite(path, f"{alice_line}\n{bob_line}\n")
        assert tokens.lookup(bob) == Principal("bob", "token")  # added without a restart
        rewrite(path, f"{bob_line}\n")
        assert tokens.lookup(alice) is None  # revoked without a restart
        assert tokens.lookup(bob) == Principal("bob", "token")
    reloads = [entry["tokens"] for entry in logs if entry["event"] == "tokens_file_reloaded"]
    assert reloads == [2, 1]


def break_file(path: Path, how: str, token: str) -> None:
    """Spoil a tokens file the way an operator's mistake would."""
    if how == "a token instead of a hash":
        rewrite(path, f"bob {token}\n")
    elif how == "one field":
        rewrite(path, "only-a-name\n")
    elif how == "not UTF-8":
        path.write_bytes(b"\xff\xfe garbage\n")
    else:
        path.unlink()


@pytest.mark.parametrize("breakage", ["a token instead of a hash", "one field", "not UTF-8", "removed"])
def test_a_broken_new_file_keeps_the_last_good_one_and_says_so(tmp_path: Path, breakage: str) -> None:
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    path = tokens_file(tmp_path, alice_line)
    tokens = TokenFile(path)
    with capture_logs() as logs:
        break_file(path, breakage, bob)
        assert tokens.lookup(alice) == Principal("alice", "token")
        assert tokens.lookup(bob) is None
    errors = [entry for entry in logs if entry["event"] == "tokens_file_unreadable"]
    assert errors and errors[0]["kept"] == "last good" and errors[0]["log_level"] == "error"
    assert bob not in json.dumps(logs)  # the refusal never logs the token it found in the file
    # Once fixed, the new file takes over.
    path.write_text("", encoding="utf-8")  # exists again, whatever the breakage was
    rewrite(path, f"{bob_line}\n")
    assert tokens.lookup(bob) == Principal("bob", "token")
    assert tokens.lookup(alice) is None


def test_new_token_makes_a_random_prefixed_token_and_the_line_that_admits_it() -> None:
    token, line = new_token("alice@example.com")
    assert TOKEN_SHAPE.fullmatch(token), token
    assert line == f"alice@example.com {hashlib.sha256(token.encode()).hexdigest()}"
    assert token_digest(token) == digest(token)
    assert parse_tokens_file(line, "x") == [("alice@example.com", digest(token))]
    assert len({new_token("alice")[0] for _ in range(20)}) == 20


@pytest.mark.parametrize("name", ["a", "svc.bot_1-x", "alice@example.com", "7", "n" * 64])
def test_new_token_takes_plain_names(name: str) -> None:
    assert new_token(name)[1].split()[0] == name


@pytest.mark.parametrize(
    "name", ["", "-alice", ".alice", "al ice", "al/ice", "alice\n", "ålice", "n" * 65, "a:b", "a#b"]
)
def test_new_token_refuses_names_a_tokens_file_could_not_hold(name: str) -> None:
    with pytest.raises(ConfigurationError, match="a token name must be 1-64"):
        new_token(name)


# -- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",  # noqa: S104 - an address to judge, not one to bind
        "::",
        "10.0.0.1",
        "192.168.1.2",
        "example.com",
        "",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
    ],
)
def test_hosts_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    "url",
    [
        "https://issuer.example/.well-known/jwks.json",
        "https://10.0.0.1/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_a_jwks_url_over_https_or_on_loopback_is_accepted(url: str) -> None:
    check_jwks_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://issuer.example/jwks",
        "http://10.0.0.1/jwks",
        "http://127.0.0.1.nip.io/jwks",
        "http://localhost.evil.example/jwks",
        "ftp://127.0.0.1/jwks",
        "file:///etc/jwks.json",
        "HTTPS-ish://x",
    ],
)
def test_a_jwks_url_in_clear_text_off_loopback_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="auth_jwks_url must be an https URL"):
        check_jwks_url(url)


# -- JWTs ----------------------------------------------------------------------------------------


class JwksServer:
    """A JWKS on loopback, served from a thread; ``hits`` counts the GETs it answered."""

    def __init__(self) -> None:
        self.document: bytes = b'{"keys": []}'
        self.hits = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits += 1
                    body = server.document
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/jwks.json"

    def publish(self, *keys: dict[str, Any]) -> None:
        with self._lock:
            self.document = json.dumps({"keys": list(keys)}).encode()

    def serve_raw(self, body: bytes) -> None:
        with self._lock:
            self.document = body

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=WITHIN)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk | {"kid": kid, "use": "sig"} | extra


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk | {"kid": kid, "use": "sig", "alg": "ES256"}


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.publish(rsa_jwk(rsa_key, "rsa-1", alg="RS256"), ec_jwk(ec_key, "ec-1"))
        yield server


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for the tests' issuer and audience, changed (a None value removes the claim)."""
    now = int(time.time())
    values: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    values |= changes
    return {name: value for name, value in values.items() if value is not None}


def signed(key: Any, *, kid: str | None = "rsa-1", algorithm: str = "RS256", **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A JWT built by hand, as an attacker would: ``sign(signing_input)`` makes its signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if sign is None else sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def verifier(server: JwksServer) -> JwtVerifier:
    return JwtVerifier(ISSUER, AUDIENCE, server.url)


async def verify(server: JwksServer, token: str) -> tuple[Principal, int] | None:
    with anyio.fail_after(WITHIN):
        return await verifier(server).verify(token)


async def test_a_good_jwt_names_its_subject_under_its_issuer(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    exp = int(time.time()) + 120
    assert await verify(jwks, signed(rsa_key, exp=exp)) == (Principal("alice", "jwt", ISSUER), exp)
    found = await verify(jwks, signed(ec_key, kid="ec-1", algorithm="ES256", sub="svc:ci@example"))
    assert found is not None
    assert found[0] == Principal("svc:ci@example", "jwt", ISSUER)
    assert found[0].key == f"jwt:{ISSUER}:svc:ci@example"
    assert found[0].key != Principal("alice", "token").key  # a JWT's "alice" is not the token named alice


async def test_a_key_set_with_one_key_serves_tokens_without_a_kid(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    assert await verify(jwks, signed(rsa_key, kid=None)) is None  # two keys: which one is not said
    jwks.publish(rsa_jwk(rsa_key, "rsa-1"))
    found = await verify(jwks, signed(rsa_key, kid=None))
    assert found is not None and found[0].name == "alice"


@pytest.mark.parametrize(
    "changes",
    [
        # Times as offsets, turned into timestamps when the test runs (not when pytest collects it).
        pytest.param({"exp": -JWT_LEEWAY_SECONDS - 60}, id="expired"),
        pytest.param({"exp": None}, id="no exp"),
        pytest.param({"nbf": JWT_LEEWAY_SECONDS + 60}, id="not yet valid (nbf)"),
        pytest.param({"iss": "https://other-issuer.example"}, id="another issuer"),
        pytest.param({"iss": None}, id="no iss"),
        pytest.param({"aud": "someone-else"}, id="another audience"),
        pytest.param({"aud": None}, id="no aud"),
        pytest.param({"sub": None}, id="no sub"),
        pytest.param({"sub": ""}, id="empty sub"),
        pytest.param({"sub": 42}, id="sub not a string"),
        pytest.param({"sub": "s" * 257}, id="sub too long"),
    ],
)
async def test_a_jwt_with_a_wrong_claim_authenticates_no_one(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, changes: dict[str, Any]
) -> None:
    now = int(time.time())
    changes = {
        claim: now + value if claim in {"exp", "nbf"} and value is not None else value
        for claim, value in changes.items()
    }
    token = signed(rsa_key, **changes)
    with capture_logs() as logs:
        assert await verify(jwks, token) is None
    refusals = [entry for entry in logs if entry["event"] == "jwt_refused"]
    assert len(refusals) == 1
    assert token not in json.dumps(logs) and token.split(".")[2] not in json.dumps(logs)


async def test_clock_skew_within_the_leeway_is_allowed(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    assert await verify(jwks, signed(rsa_key, exp=now - JWT_LEEWAY_SECONDS // 2)) is not None
    assert await verify(jwks, signed(rsa_key, nbf=now + JWT_LEEWAY_SECONDS // 2)) is not None
    assert await verify(jwks, signed(rsa_key, sub="s" * 256)) is not None


async def test_a_jwt_signed_by_another_key_under_a_published_kid_is_refused(jwks: JwksServer) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await verify(jwks, signed(stranger, kid="rsa-1")) is None


async def test_a_jwt_whose_kid_is_not_published_is_refused(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    assert await verify(jwks, signed(rsa_key, kid="rsa-2")) is None


async def test_alg_none_is_refused(jwks: JwksServer) -> None:
    for header in ({"alg": "none", "kid": "rsa-1"}, {"alg": "none"}, {"alg": "None", "kid": "rsa-1"}, {"kid": "rsa-1"}):
        assert await verify(jwks, forged(header, claims())) is None, header
    assert await verify(jwks, jwt.encode(claims(), "", algorithm="none")) is None


async def test_hs256_signed_with_the_published_public_key_is_refused(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic key confusion: an HMAC whose secret is the issuer's public key, in every form an
    implementation might use as the secret."""
    public = rsa_key.public_key()
    secrets = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps(rsa_jwk(rsa_key, "rsa-1")).encode(),
    ]
    for secret in secrets:
        for algorithm in ("HS256", "HS384", "HS512"):
            digestmod = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[algorithm]

            def sign(data: bytes, secret: bytes = secret, digestmod: Any = digestmod) -> bytes:
                return hmac.new(secret, data, digestmod).digest()

            token = forged({"alg": algorithm, "typ": "JWT", "kid": "rsa-1"}, claims(), sign)
            assert await verify(jwks, token) is None, algorithm


async def test_a_symmetric_key_in_the_set_is_never_used(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    jwks.publish(rsa_jwk(rsa_key, "rsa-1"), {"kty": "oct", "kid": "sym", "k": b64(secret)})
    assert await verify(jwks, jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "sym"})) is None
    jwks.publish({"kty": "oct", "kid": "sym", "k": b64(secret), "alg": "HS256"})
    assert await verify(jwks, jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "sym"})) is None
    assert await verify(jwks, jwt.encode(claims(), secret, algorithm="HS256")) is None  # no kid: the only key


async def test_a_token_whose_alg_differs_from_its_keys_alg_is_refused(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    """rsa-1 is published for RS256: the same key's signature under RS512 or PS256 is not accepted."""
    assert await verify(jwks, signed(rsa_key, algorithm="RS512")) is None
    assert await verify(jwks, signed(rsa_key, algorithm="PS256")) is None
    jwks.publish(rsa_jwk(rsa_key, "rsa-1"))  # no alg declared: any allowed RSA algorithm
    assert await verify(jwks, signed(rsa_key, algorithm="RS512")) is not None


async def test_garbage_is_refused_without_fetching_the_key_set(jwks: JwksServer) -> None:
    for token in ("a.b.c", "....", "x" * 5000, forged({"alg": "RS256", "kid": "rsa-1"}, claims())[:-3] + "!!!"):
        assert await verify(jwks, token) is None
    assert jwks.hits <= 1  # only the last one got as far as the key set


async def test_an_unreachable_jwks_refuses_the_token_without_raising(rsa_key: rsa.RSAPrivateKey) -> None:
    with JwksServer() as server:
        url = server.url
    gone = JwtVerifier(ISSUER, AUDIENCE, url)  # nothing listens there now
    with capture_logs() as logs, anyio.fail_after(WITHIN):
        assert await gone.verify(signed(rsa_key)) is None
    assert any(entry["event"] == "jwks_unavailable" for entry in logs)


@pytest.mark.parametrize(
    "body",
    [b"<html>maintenance</html>", b'{"keys": []}', b'{"keys": [{"kty": "RSA", "kid": "half"}]}'],
    ids=["not JSON", "no keys", "no usable key"],
)
async def test_a_jwks_that_answers_nonsense_refuses_the_token_without_raising(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, body: bytes
) -> None:
    jwks.serve_raw(body)
    assert await verify(jwks, signed(rsa_key)) is None


class Clock:
    """auth.py's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


async def test_unknown_kids_fetch_the_key_set_at_most_once_per_refresh_period(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    check = verifier(jwks)

    async def verify_all(*tokens: str) -> list[bool]:
        with anyio.fail_after(WITHIN):
            return [await check.verify(token) is not None for token in tokens]

    assert await verify_all(signed(rsa_key)) == [True]
    assert jwks.hits == 1
    clock.now += JWKS_REFRESH_SECONDS
    forged_kids = [signed(rsa_key, kid=f"forged-{n}") for n in range(10)]
    assert await verify_all(*forged_kids) == [False] * 10
    assert jwks.hits == 2  # the first unknown kid looked again; the others found it fetched just now

    # Many at once, once the period has passed: one fetch, whoever asks first.
    clock.now += JWKS_REFRESH_SECONDS
    refused: list[bool] = []
    async with anyio.create_task_group() as tg:
        for token in forged_kids:

            async def one(token: str = token) -> None:
                refused.extend(await verify_all(token))

            tg.start_soon(one)
    assert refused == [False] * 10
    assert jwks.hits == 3

    clock.now += JWKS_REFRESH_SECONDS - 1
    assert await verify_all(*forged_kids[:5]) == [False] * 5
    assert jwks.hits == 3
    assert await verify_all(signed(rsa_key)) == [True]  # known kids never wait for the period
    assert jwks.hits == 3


async def test_the_first_unknown_kid_after_start_waits_for_the_period_too(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    check = verifier(jwks)
    with anyio.fail_after(WITHIN):
        assert await check.verify(signed(rsa_key)) is not None
        assert await check.verify(signed(rsa_key, kid="forged")) is None
    assert jwks.hits == 1


async def test_a_rotated_in_key_is_found_once_the_refresh_period_has_passed(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    check = verifier(jwks)
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with anyio.fail_after(WITHIN):
        assert await check.verify(signed(rsa_key)) is not None
        clock.now += JWKS_REFRESH_SECONDS
        assert await check.verify(signed(rsa_key, kid="forged")) is None
        assert jwks.hits == 2
        jwks.publish(rsa_jwk(rsa_key, "rsa-1"), rsa_jwk(rotated, "rsa-2"))
        clock.now += 1
        assert await check.verify(signed(rotated, kid="rsa-2")) is None  # the set was fetched too recently
        assert jwks.hits == 2
        clock.now += JWKS_REFRESH_SECONDS
        found = await check.verify(signed(rotated, kid="rsa-2"))
        assert found is not None and found[0].name == "alice"
        assert jwks.hits == 3
        assert await check.verify(signed(rsa_key)) is not None
        assert await check.verify(signed(rotated, kid="rsa-2")) is not None
        assert jwks.hits == 3


# -- the authenticator ---------------------------------------------------------------------------


async def test_a_file_token_verifies_to_its_principal_and_the_token_is_not_kept(tmp_path: Path) -> None:
    alice, alice_line = new_token("alice")
    authenticator = Authenticator.from_settings(
        Settings.load(backend="fake", auth_tokens_file=tokens_file(tmp_path, alice_line))
    )
    verified = await authenticator.verify_token(alice)
    assert isinstance(verified, PrincipalToken)
    assert verified.principal == Principal("alice", "token")
    assert verified.client_id == "token:alice"
    assert verified.token == ""
    assert alice not in verified.model_dump_json() and alice not in repr(verified)
    assert await authenticator.verify_token(f"  {alice}\t") is not None  # surrounding blanks are not part of it
    for wrong in ("", "   ", alice.upper(), "Bearer " + alice, digest(alice), "a.b.c"):
        assert await authenticator.verify_token(wrong) is None, wrong


async def test_a_jwt_verifies_to_its_subject_with_its_expiry(
    tmp_path: Path, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    alice, alice_line = new_token("alice")
    settings = Settings.load(
        backend="fake",
        auth_tokens_file=tokens_file(tmp_path, alice_line),
        auth_jwt_issuer=ISSUER,
        auth_jwt_audience=AUDIENCE,
        auth_jwks_url=jwks.url,
    )
    authenticator = Authenticator.from_settings(settings)
    exp = int(time.time()) + 200
    token = signed(rsa_key, exp=exp, sub="alice")
    with anyio.fail_after(WITHIN):
        verified = await authenticator.verify_token(token)
        assert isinstance(verified, PrincipalToken)
        assert verified.principal == Principal("alice", "jwt", ISSUER)
        assert (verified.subject, verified.expires_at, verified.token) == ("alice", exp + JWT_LEEWAY_SECONDS, "")
        assert verified.client_id != "token:alice"  # not the file's alice: their sessions are apart
        assert token not in verified.model_dump_json()
        file_token = await authenticator.verify_token(alice)  # both kinds at once
        assert isinstance(file_token, PrincipalToken) and file_token.principal.kind == "token"
        assert await authenticator.verify_token(signed(rsa_key, aud="other")) is None


def test_an_authenticator_refuses_a_jwks_url_in_clear_text_off_loopback() -> None:
    settings = Settings.load(
        backend="fake", auth_jwt_issuer=ISSUER, auth_jwt_audience=AUDIENCE, auth_jwks_url="http://issuer.example/jwks"
    )
    with pytest.raises(ConfigurationError, match="auth_jwks_url must be an https URL"):
        Authenticator.from_settings(settings)

"""TokenVerifier: what a caller with a good, bad or odd bearer token gets back."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sessionmgr.api import auth as auth_module
from sessionmgr.api.auth import TokenVerifier, issue_token
from sessionmgr.domain.errors import AuthenticationFailed
from sessionmgr.domain.model import Principal
from sessionmgr.settings import ConfigError, Settings, load_settings

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


def settings(**env: str) -> Settings:
    return load_settings(environ={f"SESSIONMGR_{k.upper()}": v for k, v in env.items()})


def hs_verifier(**env: str) -> TokenVerifier:
    return TokenVerifier(settings(jwt_secret=SECRET, **env))


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "mad:alice", "roles": ["service"], "iat": now, "exp": now + 300, **extra}


def hs_token(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: bytes | None = None) -> str:
    """Build a JWT by hand, for tokens PyJWT refuses to produce; HS256-signed with `sign`."""
    head = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = b"" if sign is None else hmac.new(sign, head.encode(), hashlib.sha256).digest()
    return head + "." + b64url(sig)


async def refused(verifier: TokenVerifier, token: str, reason: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed, match=reason) as info:
        await verifier.verify(f"Bearer {token}")
    assert token not in str(info.value)
    return info.value


@dataclass
class KeyPair:
    private: Any
    private_pem: str
    public_pem: str


def _pair(private: Any) -> KeyPair:
    return KeyPair(
        private=private,
        private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        public_pem=private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def rsa_pair2() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pair() -> KeyPair:
    return _pair(ec.generate_private_key(ec.SECP256R1()))


# --- HS256 -------------------------------------------------------------------------------


async def test_hs256_returns_sub_and_roles() -> None:
    token = hs_token(claims(roles=["admin", "service"]))
    principal = await hs_verifier().verify(f"Bearer {token}")
    assert principal == Principal(sub="mad:alice", roles=frozenset({"admin", "service"}))
    assert principal.is_admin


async def test_scheme_is_case_insensitive_and_roles_default_to_empty() -> None:
    payload = claims()
    del payload["roles"]
    principal = await hs_verifier().verify(f"bearer {hs_token(payload)}")
    assert principal.roles == frozenset()


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
async def test_no_bearer_token_is_refused(header: str | None) -> None:
    with pytest.raises(AuthenticationFailed, match="missing bearer token"):
        await hs_verifier().verify(header)


async def test_garbage_token_is_refused() -> None:
    await refused(hs_verifier(), "not-a.jwt-at.all", "malformed")


async def test_alg_none_token_is_refused() -> None:
    token = forge({"alg": "none", "typ": "JWT"}, claims())
    assert token.endswith(".")
    await refused(hs_verifier(), token, "algorithm is not allowed")


async def test_wrong_secret_is_refused() -> None:
    token = hs_token(claims(), secret="another-secret-that-is-long-enough-987654")
    await refused(hs_verifier(), token, "signature is invalid")


async def test_expired_beyond_leeway_is_refused() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now - 600, exp=now - 45))
    await refused(hs_verifier(jwt_leeway_s="30"), token, "token expired")


async def test_expired_within_leeway_is_accepted() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now - 600, exp=now - 10))
    assert (await hs_verifier(jwt_leeway_s="30").verify(f"Bearer {token}")).sub == "mad:alice"


@pytest.mark.parametrize("claim", ["exp", "sub"])
async def test_missing_required_claim_is_refused(claim: str) -> None:
    payload = claims()
    del payload[claim]
    await refused(hs_verifier(), hs_token(payload), f"token has no {claim} claim")


@pytest.mark.parametrize("sub", ["", "x" * 257, 42])
async def test_bad_sub_is_refused(sub: object) -> None:
    # PyJWT will not encode a non-string sub, so the token is built by hand.
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(sub=sub), sign=SECRET.encode())
    await refused(hs_verifier(), token, "sub")


async def test_sub_of_256_chars_is_accepted() -> None:
    token = hs_token(claims(sub="x" * 256))
    assert (await hs_verifier().verify(f"Bearer {token}")).sub == "x" * 256


@pytest.mark.parametrize("roles", ["admin", ["admin", 1], {"admin": True}])
async def test_roles_not_a_list_of_strings_is_refused(roles: object) -> None:
    await refused(hs_verifier(), hs_token(claims(roles=roles)), "roles claim must be a list")


async def test_audience_checked_when_configured() -> None:
    verifier = hs_verifier(jwt_audience="sessionmgr")
    await refused(verifier, hs_token(claims(aud="billing")), "audience is wrong")
    await refused(verifier, hs_token(claims()), "token has no aud claim")
    assert await verifier.verify(f"Bearer {hs_token(claims(aud='sessionmgr'))}")


async def test_audience_ignored_when_not_configured() -> None:
    assert await hs_verifier().verify(f"Bearer {hs_token(claims(aud='anything'))}")


async def test_issuer_checked_when_configured() -> None:
    verifier = hs_verifier(jwt_issuer="https://idp.example")
    await refused(verifier, hs_token(claims(iss="https://evil.example")), "issuer is wrong")
    await refused(verifier, hs_token(claims()), "token has no iss claim")
    assert await verifier.verify(f"Bearer {hs_token(claims(iss='https://idp.example'))}")


async def test_rs256_token_refused_by_hs256_verifier(rsa_pair: KeyPair) -> None:
    token = jwt.encode(claims(), rsa_pair.private, algorithm="RS256")
    await refused(hs_verifier(), token, "algorithm is not allowed")


async def test_hs256_signed_with_public_pem_refused_by_rs256_verifier(rsa_pair: KeyPair) -> None:
    # Classic algorithm confusion: the attacker knows the public key and uses it as HMAC secret.
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), sign=rsa_pair.public_pem.encode())
    verifier = TokenVerifier(settings(jwt_public_key=rsa_pair.public_pem))
    await refused(verifier, token, "algorithm is not allowed")


# --- PEM keys ------------------------------------------------------------------------------


async def test_rs256_with_pem_key(rsa_pair: KeyPair, rsa_pair2: KeyPair, ec_pair: KeyPair) -> None:
    verifier = TokenVerifier(settings(jwt_public_key=rsa_pair.public_pem))
    token = jwt.encode(claims(roles=["admin"]), rsa_pair.private, algorithm="RS256")
    assert await verifier.verify(f"Bearer {token}") == Principal("mad:alice", frozenset({"admin"}))
    other = jwt.encode(claims(), rsa_pair2.private, algorithm="RS256")
    await refused(verifier, other, "signature is invalid")
    # ES256 is on the default allow-list, but this RSA key can never verify it.
    es_token = jwt.encode(claims(), ec_pair.private, algorithm="ES256")
    await refused(verifier, es_token, "algorithm is not allowed")


async def test_es256_with_pem_key(ec_pair: KeyPair, rsa_pair: KeyPair) -> None:
    verifier = TokenVerifier(settings(jwt_public_key=ec_pair.public_pem))
    token = jwt.encode(claims(), ec_pair.private, algorithm="ES256")
    assert (await verifier.verify(f"Bearer {token}")).sub == "mad:alice"
    # RS256 is on the default allow-list, but this EC key can never verify it.
    rs_token = jwt.encode(claims(), rsa_pair.private, algorithm="RS256")
    await refused(verifier, rs_token, "algorithm is not allowed")


async def test_pem_given_as_file_path(tmp_path: Path, rsa_pair: KeyPair) -> None:
    pem_file = tmp_path / "jwt.pub.pem"
    pem_file.write_text(rsa_pair.public_pem)
    verifier = TokenVerifier(settings(jwt_public_key=str(pem_file)))
    token = issue_token(rsa_pair.private_pem, "mad:bob", roles=["service"], algorithm="RS256")
    assert await verifier.verify(f"Bearer {token}") == Principal("mad:bob", frozenset({"service"}))


def test_unreadable_pem_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_PUBLIC_KEY"):
        TokenVerifier(settings(jwt_public_key=str(tmp_path / "missing.pem")))


def test_no_key_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_SECRET"):
        TokenVerifier(settings())


def test_mixed_algorithms_are_refused_even_without_load_settings() -> None:
    bad = Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "RS256"))
    with pytest.raises(ConfigError):
        TokenVerifier(bad)
    with pytest.raises(ConfigError):
        TokenVerifier(Settings(jwt_secret=SECRET, jwt_algorithms=("none",)))


# --- JWKS ----------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    hits: int = 0
    delay_s: float = 0.0
    server: ThreadingHTTPServer | None = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            time.sleep(state.delay_s)
            body = json.dumps(state.document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.server = server
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield state
    state.stop()


def jwk(pair: KeyPair, kid: str) -> dict[str, Any]:
    codec = RSAAlgorithm if isinstance(pair.private, rsa.RSAPrivateKey) else ECAlgorithm
    data: dict[str, Any] = json.loads(codec.to_jwk(pair.private.public_key()))
    return {**data, "kid": kid, "use": "sig"}


def signed(pair: KeyPair, kid: str | None, **extra: Any) -> str:
    alg = "RS256" if isinstance(pair.private, rsa.RSAPrivateKey) else "ES256"
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**extra), pair.private, algorithm=alg, headers=headers)


def jwks_verifier(server: JwksServer, **kwargs: float) -> TokenVerifier:
    return TokenVerifier(settings(jwt_jwks_url=server.url), **kwargs)


async def test_jwks_known_kid_verifies_and_is_cached(
    jwks_server: JwksServer, rsa_pair: KeyPair, ec_pair: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1"), jwk(ec_pair, "e1")]}
    verifier = jwks_verifier(jwks_server)
    assert (await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")).sub == "mad:alice"
    assert (await verifier.verify(f"Bearer {signed(ec_pair, 'e1')}")).sub == "mad:alice"
    assert jwks_server.hits == 1
    # An RSA-signed token naming the EC key's kid is refused, not checked with the wrong key.
    await refused(verifier, signed(rsa_pair, "e1"), "algorithm is not allowed")
    await verifier.aclose()


async def test_jwks_single_key_serves_token_without_kid(
    jwks_server: JwksServer, rsa_pair: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "only")]}
    assert await jwks_verifier(jwks_server).verify(f"Bearer {signed(rsa_pair, None)}")


async def test_jwks_unknown_kid_burst_causes_one_fetch(
    jwks_server: JwksServer, rsa_pair: KeyPair, rsa_pair2: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    jwks_server.delay_s = 0.05  # keep the fetch in flight while the burst piles up
    verifier = jwks_verifier(jwks_server, jwks_min_refresh_s=0)
    await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")
    assert jwks_server.hits == 1
    unknown = signed(rsa_pair2, "rotated")
    results = await asyncio.gather(
        *(verifier.verify(f"Bearer {unknown}") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, AuthenticationFailed) for r in results)
    assert "signing key is unknown" in str(results[0])
    assert jwks_server.hits == 2


async def test_jwks_unknown_kid_within_refresh_window_does_not_fetch(
    jwks_server: JwksServer, rsa_pair: KeyPair, rsa_pair2: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    verifier = jwks_verifier(jwks_server, jwks_min_refresh_s=30)
    await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")
    for _ in range(5):
        await refused(verifier, signed(rsa_pair2, "rotated"), "signing key is unknown")
    assert jwks_server.hits == 1


async def test_jwks_rotation_picks_up_new_kid(
    jwks_server: JwksServer, rsa_pair: KeyPair, rsa_pair2: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    verifier = jwks_verifier(jwks_server, jwks_min_refresh_s=0)
    await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1"), jwk(rsa_pair2, "r2")]}
    assert await verifier.verify(f"Bearer {signed(rsa_pair2, 'r2', sub='mad:bob')}") == Principal(
        "mad:bob", frozenset({"service"})
    )
    assert jwks_server.hits == 2


async def test_jwks_server_down_fails_but_cached_keys_still_verify(
    jwks_server: JwksServer, rsa_pair: KeyPair, rsa_pair2: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    verifier = jwks_verifier(jwks_server, jwks_min_refresh_s=0)
    cold = jwks_verifier(jwks_server, jwks_min_refresh_s=0)
    await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")
    jwks_server.stop()
    await refused(cold, signed(rsa_pair, "r1"), "signing keys unavailable")
    await refused(verifier, signed(rsa_pair2, "r2"), "signing keys unavailable")
    assert (await verifier.verify(f"Bearer {signed(rsa_pair, 'r1')}")).sub == "mad:alice"


async def test_jwks_slow_server_is_bounded_by_timeout(
    jwks_server: JwksServer, rsa_pair: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    jwks_server.delay_s = 2.0
    verifier = jwks_verifier(jwks_server, jwks_fetch_timeout_s=0.2)
    started = time.monotonic()
    await refused(verifier, signed(rsa_pair, "r1"), "signing keys unavailable")
    assert time.monotonic() - started < 1.5


# --- issue_token -----------------------------------------------------------------------------


async def test_issue_token_round_trips() -> None:
    verifier = hs_verifier(jwt_audience="sessionmgr", jwt_issuer="https://idp.example")
    token = issue_token(
        SECRET, "mad:carol", roles=["admin"], audience="sessionmgr", issuer="https://idp.example"
    )
    assert await verifier.verify(f"Bearer {token}") == Principal("mad:carol", frozenset({"admin"}))


async def test_issued_token_expires() -> None:
    token = issue_token(SECRET, "mad:carol", ttl_s=-120)
    await refused(hs_verifier(jwt_leeway_s="0"), token, "token expired")


def test_issue_token_refuses_alg_none() -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, "mad:carol", algorithm="none")


# The verified-token cache: a hit skips PyJWT, re-checks exp, and lives a bounded time.


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    decode = auth_module._JWT.decode

    def counted(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(auth_module._JWT, "decode", counted)
    return calls


async def test_a_cached_token_skips_pyjwt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_decode(monkeypatch)
    verifier = hs_verifier()
    token = hs_token(claims())
    first = await verifier.verify(f"Bearer {token}")
    assert await verifier.verify(f"Bearer {token}") == first
    assert await verifier.verify(f"bearer {token}") == first
    assert calls == [token]


async def test_an_expired_cached_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_decode(monkeypatch)
    now = time.time()
    clock = _Clock(now)
    verifier = TokenVerifier(settings(jwt_secret=SECRET, jwt_leeway_s="5"), clock=clock)
    token = hs_token(claims(exp=int(now) + 30))
    await verifier.verify(f"Bearer {token}")
    clock.now = now + 34  # within the leeway: still good, still cached
    await verifier.verify(f"Bearer {token}")
    clock.now = int(now) + 30 + 5
    await refused(verifier, token, "token expired")
    assert calls == [token]


async def test_a_tampered_token_is_verified_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_decode(monkeypatch)
    verifier = hs_verifier()
    token = hs_token(claims())
    await verifier.verify(f"Bearer {token}")
    head, payload, sig = token.split(".")
    admin = b64url(json.dumps(claims(roles=["admin"])).encode())
    for tampered in (f"{head}.{admin}.{sig}", f"{head}.{payload}.{sig[:-2]}AA"):
        await refused(verifier, tampered, "signature is invalid")
    assert calls == [token, f"{head}.{admin}.{sig}", f"{head}.{payload}.{sig[:-2]}AA"]


async def test_a_failure_is_never_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_decode(monkeypatch)
    verifier = hs_verifier()
    token = hs_token(claims(), secret="another-secret-that-is-long-enough-0123456789")
    for _ in range(2):
        await refused(verifier, token, "signature is invalid")
    assert calls == [token, token]


async def test_a_cached_token_is_verified_again_after_the_cache_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting_decode(monkeypatch)
    ticks = _Clock(1000.0)
    verifier = TokenVerifier(settings(jwt_secret=SECRET), cache_ttl_s=60, monotonic=ticks)
    token = hs_token(claims())
    await verifier.verify(f"Bearer {token}")
    ticks.now += 59
    await verifier.verify(f"Bearer {token}")
    assert len(calls) == 1
    ticks.now += 2
    await verifier.verify(f"Bearer {token}")
    assert len(calls) == 2


async def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_decode(monkeypatch)
    verifier = TokenVerifier(settings(jwt_secret=SECRET), cache_size=2)
    tokens = [hs_token(claims(sub=f"mad:{n}")) for n in range(3)]
    for token in tokens:
        await verifier.verify(f"Bearer {token}")
    assert len(verifier._verified) <= 2
    await verifier.verify(f"Bearer {tokens[2]}")  # the newest survived the clear
    assert len(calls) == 3


async def test_cached_answers_only_what_verify_would_answer_from_its_cache() -> None:
    """The read lane's question (sessionmgr/api/lane.py): no verification, no change."""
    now = time.time()
    clock, ticks = _Clock(now), _Clock(1000.0)
    verifier = TokenVerifier(
        settings(jwt_secret=SECRET, jwt_leeway_s="5"), clock=clock, monotonic=ticks, cache_ttl_s=60
    )
    token = hs_token(claims(exp=int(now) + 30))
    assert verifier.cached(f"Bearer {token}") is None  # never verified
    principal = await verifier.verify(f"Bearer {token}")
    assert verifier.cached(f"Bearer {token}") == principal
    assert verifier.cached(f"bearer {token}") == principal
    for other in (None, "", token, f"Basic {token}", f"Bearer  {token}", f"Bearer {token}x"):
        assert verifier.cached(other) is None  # verify decides those
    ticks.now += 61  # due to be verified again
    assert verifier.cached(f"Bearer {token}") is None
    ticks.now -= 61
    clock.now = int(now) + 30 + 5  # expired beyond the leeway
    assert verifier.cached(f"Bearer {token}") is None
    assert len(verifier._verified) == 1  # nothing dropped: verify drops it, and says why
    await refused(verifier, token, "token expired")


async def test_a_jwks_refresh_forgets_the_verified_tokens(
    jwks_server: JwksServer, rsa_pair: KeyPair, rsa_pair2: KeyPair
) -> None:
    jwks_server.document = {"keys": [jwk(rsa_pair, "r1")]}
    verifier = jwks_verifier(jwks_server, jwks_min_refresh_s=0)
    old = signed(rsa_pair, "r1")
    await verifier.verify(f"Bearer {old}")
    # The IdP rotates r1 out; a token signed with the new key makes the verifier refetch.
    jwks_server.document = {"keys": [jwk(rsa_pair2, "r2")]}
    await verifier.verify(f"Bearer {signed(rsa_pair2, 'r2')}")
    await refused(verifier, old, "signing key is unknown")

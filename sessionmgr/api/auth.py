"""Bearer-token verification (DESIGN §5): HS* with a secret, RS*/ES*/PS* with a PEM or JWKS."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidSubjectError

from sessionmgr.domain.errors import AuthenticationFailed
from sessionmgr.domain.model import Principal
from sessionmgr.settings import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    PREFIX,
    ConfigError,
    Settings,
    effective_algorithms,
)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
MAX_TOKEN_CHARS = 8192  # far above any real token; stops a huge header from costing a parse
MAX_SUB_CHARS = 256
MAX_JWKS_BYTES = 1_048_576
TOKEN_CACHE_SIZE = 10_000  # verified tokens remembered; the map is emptied when it is full
TOKEN_CACHE_TTL_S = 60.0  # a verified token is re-verified after this long, whatever its exp
# exp, nbf and iat are NumericDates: whole or fractional seconds from 1970 up to year 9999.
MAX_NUMERIC_DATE = 253_402_300_799
TIME_CLAIMS = ("exp", "nbf", "iat")
_EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

# Most specific first: InvalidSignatureError is a DecodeError, every one an InvalidTokenError.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token is not valid yet"),
    (jwt.InvalidAudienceError, "token audience is wrong"),
    (jwt.InvalidIssuerError, "token issuer is wrong"),
    (jwt.InvalidIssuedAtError, "token iat claim is invalid"),
    (InvalidSubjectError, "token sub claim is invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.DecodeError, "token is malformed"),
)


class _BadClaim(jwt.DecodeError):
    """A payload PyJWT would take or choke on, refused with this message as the 401's reason."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _BadClaim("token payload repeats a key")
    return obj


def _no_constant(name: str) -> Any:
    raise _BadClaim(f"token payload holds {name}, which is not JSON")


def _check_time_claims(payload: dict[str, Any]) -> None:
    for name in TIME_CLAIMS:
        if name not in payload:
            continue
        value = payload[name]
        valid = isinstance(value, int | float) and not isinstance(value, bool)
        if not valid or not 0 <= value <= MAX_NUMERIC_DATE:  # NaN fails the comparison too
            raise _BadClaim(f"token {name} claim is invalid")


class _StrictJWT(jwt.PyJWT):
    """PyJWT with a strict payload parse: no repeated keys, no NaN or Infinity, and
    exp/nbf/iat plain dates (a 10^309 exp verified by PyJWT would overflow a float later)."""

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = json.loads(
                decoded["payload"],
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_no_constant,
            )
        except (ValueError, RecursionError) as exc:
            raise jwt.DecodeError(f"Invalid payload string: {exc}") from None
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        _check_time_claims(payload)
        return payload


_JWT = _StrictJWT()


def _algorithms_for(key: PublicKey, allowed: Sequence[str]) -> tuple[str, ...]:
    """The allowed algorithms this key can actually verify (an EC key only for its own curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return tuple(a for a in allowed if a.startswith(("RS", "PS")))
    return tuple(a for a in allowed if a == _EC_CURVES.get(key.curve.name))


def _load_pem(value: str) -> PublicKey:
    var = f"{PREFIX}JWT_PUBLIC_KEY"
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            value = Path(value).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{var} names a file that cannot be read: {exc}") from None
    try:
        key = load_pem_public_key(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(f"{var} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"{var} must be an RSA or EC public key")
    return key


def _check_algorithms(settings: Settings) -> tuple[str, ...]:
    """Re-check what `load_settings` enforces: a `Settings` may be built without it."""
    if sum(map(bool, (settings.jwt_secret, settings.jwt_public_key, settings.jwt_jwks_url))) != 1:
        raise ConfigError(
            f"set exactly one of {PREFIX}JWT_SECRET, {PREFIX}JWT_PUBLIC_KEY or {PREFIX}JWT_JWKS_URL"
        )
    algs = effective_algorithms(settings)
    wanted = HMAC_ALGORITHMS if settings.jwt_secret else ASYMMETRIC_ALGORITHMS
    if not algs or not set(algs) <= wanted:
        raise ConfigError(f"{PREFIX}JWT_ALGORITHMS {list(algs)} do not fit the configured key")
    return algs


class TokenVerifier:
    """Turns an `Authorization: Bearer …` header into a `Principal` or AuthenticationFailed."""

    def __init__(
        self,
        settings: Settings,
        *,
        jwks_fetch_timeout_s: float = 2.0,
        jwks_min_refresh_s: float = 30.0,
        cache_size: int = TOKEN_CACHE_SIZE,
        cache_ttl_s: float = TOKEN_CACHE_TTL_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._algorithms = _check_algorithms(settings)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = min(settings.jwt_leeway_s, 60)
        self._max_lifetime = settings.jwt_max_lifetime_s
        self._required = ["exp", "sub"]
        if settings.jwt_require_iat or self._max_lifetime is not None:
            self._required.append("iat")
        self._secret = settings.jwt_secret.encode() if settings.jwt_secret else None
        self._pem = _load_pem(settings.jwt_public_key) if settings.jwt_public_key else None
        if self._pem is not None and not _algorithms_for(self._pem, self._algorithms):
            raise ConfigError(f"{PREFIX}JWT_ALGORITHMS {list(self._algorithms)} do not fit the key")
        self._jwks_url = settings.jwt_jwks_url
        self._fetch_timeout = jwks_fetch_timeout_s
        self._min_refresh = jwks_min_refresh_s
        self._jwks: dict[str | None, PublicKey] = {}
        self._jwks_lock = asyncio.Lock()
        self._jwks_attempts = 0  # bumped as each fetch ends, so lock waiters see one happened
        self._jwks_last_attempt = -float("inf")
        self._jwks_failed = False
        # token -> (principal, exp, monotonic time the entry stops being trusted). Only tokens
        # that verified are kept; a hit re-checks exp and skips PyJWT's parse and HMAC/RSA.
        self._verified: dict[str, tuple[Principal, float, float]] = {}
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl_s
        self._clock = clock
        self._monotonic = monotonic

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal of a bearer token `verify` accepted and still trusts, from its cache;
        None for any other value (no token, a new one, one expired or due to be checked
        again): `verify` answers those. Changes nothing."""
        if authorization is None or not authorization.startswith(("Bearer ", "bearer ")):
            return None
        hit = self._verified.get(authorization[7:])
        if hit is None:
            return None
        principal, exp, until = hit
        if self._clock() >= exp + self._leeway or self._monotonic() >= until:
            return None
        return principal

    async def verify(self, authorization: str | None) -> Principal:
        """Check the bearer token in a raw Authorization header value; return its principal."""
        parts = (authorization or "").split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthenticationFailed("missing bearer token")
        token = parts[1]
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationFailed("token is too long")
        if (hit := self._verified.get(token)) is not None:
            principal, exp, until = hit
            if self._clock() >= exp + self._leeway:
                del self._verified[token]
                raise AuthenticationFailed("token expired")
            if self._monotonic() < until:
                return principal
            del self._verified[token]  # trusted long enough: verify it again (keys may rotate)
        principal, exp = await self._verify(token)
        if len(self._verified) >= self._cache_size:
            self._verified.clear()
        self._verified[token] = (principal, exp, self._monotonic() + self._cache_ttl)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        key, algorithms = await self._key_for(token)
        try:
            claims = _JWT.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._required, "verify_aud": self._audience is not None},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationFailed(f"token has no {exc.claim} claim") from None
        except _BadClaim as exc:
            raise AuthenticationFailed(str(exc)) from None
        except jwt.PyJWTError as exc:
            reason = next((r for t, r in _REASONS if isinstance(exc, t)), "token is invalid")
            raise AuthenticationFailed(reason) from None
        except (TypeError, ValueError):  # a key/algorithm mismatch deep in cryptography
            raise AuthenticationFailed("token is invalid") from None
        if self._max_lifetime is not None and claims["exp"] - claims["iat"] > self._max_lifetime:
            raise AuthenticationFailed(
                f"token lives longer than {self._max_lifetime} s (exp - iat); ask for a shorter one"
            )
        return _principal(claims), float(claims["exp"])

    async def aclose(self) -> None:
        """Forget the cached signing keys and verified tokens."""
        self._jwks.clear()
        self._verified.clear()

    async def _key_for(self, token: str) -> tuple[PublicKey | bytes, tuple[str, ...]]:
        if self._secret is not None:
            return self._secret, self._algorithms
        if self._pem is not None:
            return self._pem, _algorithms_for(self._pem, self._algorithms)
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthenticationFailed("token is malformed") from None
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationFailed("token kid header is invalid")
        key = self._cached_key(kid)
        if key is None:
            await self._refresh(self._jwks_attempts)
            key = self._cached_key(kid)
        if key is None:
            if kid is None and len(self._jwks) > 1:
                raise AuthenticationFailed("token has no kid header")
            if self._jwks_failed:
                raise AuthenticationFailed("signing keys unavailable")
            raise AuthenticationFailed("token signing key is unknown")
        return key, _algorithms_for(key, self._algorithms)

    def _cached_key(self, kid: str | None) -> PublicKey | None:
        if kid is None:  # with a single key, a token need not name it
            return next(iter(self._jwks.values())) if len(self._jwks) == 1 else None
        return self._jwks.get(kid)

    async def _refresh(self, seen_attempts: int) -> None:
        """Refetch the JWKS unless another caller just did or the last try is too recent."""
        async with self._jwks_lock:
            if self._jwks_attempts != seen_attempts:
                return  # fetched while we waited for the lock: one fetch serves the burst
            if time.monotonic() - self._jwks_last_attempt < self._min_refresh:
                return  # unknown kids must not turn into a request storm on the IdP
            self._jwks_last_attempt = time.monotonic()
            try:
                raw = await asyncio.wait_for(
                    asyncio.to_thread(self._fetch_jwks), self._fetch_timeout
                )
                self._jwks, self._jwks_failed = self._parse_jwks(raw), False
                self._verified.clear()  # a key that left the set must stop verifying now
            except (OSError, TimeoutError, ValueError, TypeError, http.client.HTTPException):
                self._jwks_failed = True  # keep the keys we have: they still verify
            finally:
                self._jwks_attempts += 1

    def _fetch_jwks(self) -> bytes:
        assert self._jwks_url is not None
        # The URL comes from validated settings (http/https only), never from a request.
        with urllib.request.urlopen(self._jwks_url, timeout=self._fetch_timeout) as resp:  # noqa: S310
            body: bytes = resp.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document is too large")
        return body

    def _parse_jwks(self, raw: bytes) -> dict[str | None, PublicKey]:
        document = json.loads(raw)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise TypeError("JWKS document has no keys list")
        keys: dict[str | None, PublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # an unusable key must not hide the usable ones
            # Only public keys of a kind the allow-list covers: never HMAC ("oct") or private keys.
            public = isinstance(jwk.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
            if public and _algorithms_for(jwk.key, self._algorithms):
                keys[jwk.key_id] = jwk.key
        if not keys:  # an empty set is an IdP hiccup, not a rotation: keep what we have
            raise ValueError("JWKS document has no usable keys")
        return keys


def _principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_CHARS:
        raise AuthenticationFailed(f"sub claim must be a string of 1 to {MAX_SUB_CHARS} characters")
    # It becomes owner_id, an ACL entry and every event's actor: no control, format (bidi,
    # zero-width) or line-separator characters, which would forge log lines or hide text.
    if not sub.isprintable():
        raise AuthenticationFailed("sub claim must be printable characters only")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthenticationFailed("roles claim must be a list of strings")
    return Principal(sub=sub, roles=frozenset(roles))


def issue_token(
    secret: str,
    sub: str,
    *,
    roles: Sequence[str] = (),
    ttl_s: int = 3600,
    audience: str | None = None,
    issuer: str | None = None,
    algorithm: str = "HS256",
) -> str:
    """Sign a token for `sub` (dev and tests); `secret` is the HMAC secret or a private PEM."""
    if algorithm.lower() == "none":
        raise ValueError("refusing to issue an unsigned token")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "roles": list(roles), "iat": now, "exp": now + ttl_s}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)

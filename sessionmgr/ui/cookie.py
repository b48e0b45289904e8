"""The inspector's sign-in cookie: the bearer token, an expiry and a nonce, signed by the service.

The cookie holds the token the person pasted (it is re-verified on every request with the
API's `TokenVerifier`, so the API's JWT rules apply unchanged) and is refused once its own
short lifetime ends or its HMAC does not match. The CSRF token of the mutating forms is an HMAC
of the cookie's nonce: a page of this origin can read it from the form, another origin cannot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import msgspec

COOKIE_NAME = "sessionmgr_ui"
_VERSION = "v1"


class BadCookie(Exception):
    """The cookie is absent, forged, altered or expired."""


class SignedIn(msgspec.Struct, frozen=True):
    token: str
    nonce: str
    expires_at: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CookieSigner:
    """Signs and checks cookie values with one HMAC-SHA256 key (from settings, or random)."""

    def __init__(self, key: bytes, lifetime_s: int, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("the cookie key must be at least 32 bytes")
        self._key = key
        self.lifetime_s = lifetime_s
        self._clock = clock

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode("ascii"), hashlib.sha256).digest())

    def issue(self, token: str, token_exp: float | None = None) -> tuple[str, int]:
        """The cookie value for `token` and how many seconds it lives (never past the token)."""
        now = int(self._clock())
        expires = now + self.lifetime_s
        if token_exp is not None:
            expires = min(expires, int(token_exp))
        body = f"{_VERSION}.{expires}.{secrets.token_urlsafe(16)}.{_b64(token.encode())}"
        return f"{body}.{self._mac(body)}", max(0, expires - now)

    def read(self, value: str | None) -> SignedIn:
        if not value:
            raise BadCookie("not signed in")
        body, _, mac = value.rpartition(".")
        if not body or not hmac.compare_digest(mac, self._mac(body)):
            raise BadCookie("the sign-in cookie is not one this service signed")
        version, expires, nonce, token = body.split(".")
        if version != _VERSION or int(expires) <= self._clock():
            raise BadCookie("the sign-in has expired")
        return SignedIn(token=_unb64(token).decode(), nonce=nonce, expires_at=int(expires))

    def csrf(self, signed: SignedIn) -> str:
        """The token every mutating form of this sign-in carries."""
        return self._mac(f"csrf.{signed.nonce}")

    def check_csrf(self, signed: SignedIn, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent, self.csrf(signed))

"""Who is looking: the signed-in principal of a `/ui` request, checked before every handler."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from sessionmgr.api import conditional
from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.bridge import resolved
from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.domain.errors import AuthenticationFailed, InvalidInput
from sessionmgr.domain.model import Principal
from sessionmgr.domain.preconditions import Precondition
from sessionmgr.services.ports import Idempotency
from sessionmgr.ui.cookie import COOKIE_NAME, BadCookie, CookieSigner, SignedIn

FORM_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class NotSignedIn(Exception):
    """No valid sign-in cookie, or its token no longer verifies: the page asks to sign in."""


class CsrfRefused(Exception):
    """A mutating form without this sign-in's CSRF token, or posted from another origin."""


def signer(connection: ASGIConnection[Any, Any, Any, Any]) -> CookieSigner:
    found: CookieSigner = connection.app.state.ui_signer
    return found


async def principal_of(
    connection: ASGIConnection[Any, Any, Any, Any], cookie: str | None
) -> tuple[Principal, SignedIn]:
    """The principal of a cookie value, under the API's own JWT rules and rate limit."""
    try:
        signed = signer(connection).read(cookie)
    except (BadCookie, ValueError, UnicodeDecodeError) as exc:
        raise NotSignedIn(str(exc)) from None
    verifier: TokenVerifier = resolved(connection, "verifier")
    try:
        principal = await verifier.verify(f"Bearer {signed.token}")
    except AuthenticationFailed as exc:
        raise NotSignedIn(str(exc)) from None
    limiter: RateLimiter = resolved(connection, "rate_limiter")
    limiter.take(principal.sub, service="service" in principal.roles)
    return principal, signed


async def signed_in(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The guard of every `/ui` route but the sign-in form's: puts the principal in scope."""
    if handler.opt.get("public"):
        return
    principal, signed = await principal_of(connection, connection.cookies.get(COOKIE_NAME))
    connection.scope["user"] = principal
    connection.scope["auth"] = signed


def same_origin(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """A POST that a page of this origin sent (browsers send Origin on every POST)."""
    origin = connection.headers.get("origin")
    if origin is None:
        return connection.headers.get("sec-fetch-site") in (None, "same-origin")
    host = connection.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def check_form(
    connection: ASGIConnection[Any, Any, Any, Any], signed: SignedIn, csrf: str | None
) -> None:
    if not same_origin(connection) or not signer(connection).check_csrf(signed, csrf):
        raise CsrfRefused("this form did not come from a page of this sign-in: reload and retry")


def form_idempotency(principal: Principal, key: str, path: str, tag: str) -> Idempotency:
    """The Idempotency-Key a form carries (one per rendering), scoped like the API's."""
    if not FORM_KEY.fullmatch(key):
        raise InvalidInput("the form's idempotency key is malformed: reload the page", "idem")
    scope = hashlib.sha256(f"{principal.sub}\x00ui:{key}".encode()).hexdigest()
    caller = hashlib.sha256(principal.sub.encode()).hexdigest()[:32]
    fingerprint = hashlib.sha256(f"POST {path}\nif-match: {tag}\n".encode()).hexdigest()
    return Idempotency(key_digest=scope, fingerprint=fingerprint, caller=caller)


def version_precondition(version: int) -> Precondition:
    found = conditional.if_match(conditional.version_tag(version))
    assert found is not None
    return found

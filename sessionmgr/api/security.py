"""Authentication of every `/v1` call: the bearer token becomes the request's `Principal`."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.bridge import resolved

PUBLIC_PATHS = ["^/health", "^/metrics", "^/schema"]


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        verifier: TokenVerifier = resolved(connection, "verifier")
        principal = await verifier.verify(connection.headers.get("authorization"))
        return AuthenticationResult(user=principal, auth=None)

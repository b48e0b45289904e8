"""What `create_app` adds for the inspector: its routes, templates, static files and key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any

from litestar import Request, Response, Router
from litestar.exceptions import HTTPException
from litestar.openapi.plugins import RedocRenderPlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig
from litestar.types import ControllerRouterHandler

from sessionmgr.api.problems import domain_error
from sessionmgr.domain.errors import SessionError
from sessionmgr.settings import Settings
from sessionmgr.ui.access import CsrfRefused, NotSignedIn, signed_in
from sessionmgr.ui.changes import FeedRelay
from sessionmgr.ui.cookie import COOKIE_NAME, CookieSigner
from sessionmgr.ui.pages import UiController

HERE = Path(__file__).parent
STATIC_PATH = "/static"
# Scripts, styles and every fetch from this origin only; no inline script or style, no
# frames, no plugins, forms post back here only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Origin `null` on our own POSTs
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _with_headers(response: Response[Any]) -> Response[Any]:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _after(response: Response[Any]) -> Response[Any]:
    if isinstance(response, FeedRelay):  # the feed's own answer, headers and all
        return response
    return _with_headers(response)


def _not_signed_in(request: Request[Any, Any, Any], exc: NotSignedIn) -> Response[Any]:
    if request.method == "GET" and "hx-request" not in request.headers:
        response: Response[Any] = Redirect("/ui/sign-in", status_code=303)
    else:
        response = Template("error.html.j2", context={"detail": str(exc)}, status_code=401)
    response.delete_cookie(COOKIE_NAME, path="/ui")
    return _with_headers(response)


def _error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, SessionError):
        status = domain_error(request, exc).status_code or 500
    elif isinstance(exc, HTTPException):
        status = exc.status_code
    else:
        status = 403  # CsrfRefused
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return _with_headers(
        Template(
            "error.html.j2",
            context={"detail": detail, "status": status, "principal": request.scope.get("user")},
            status_code=status,
        )
    )


def cookie_key(settings: Settings) -> bytes:
    """`ui_cookie_key` when set; else derived from the JWT secret (every process and replica
    sharing the secret derives the same key); else random, for this process only."""
    if settings.ui_cookie_key:
        return hashlib.sha256(settings.ui_cookie_key.encode()).digest()
    if settings.jwt_secret:
        return hmac.new(settings.jwt_secret.encode(), b"sessionmgr ui cookie", "sha256").digest()
    return secrets.token_bytes(32)


def ui_handlers(settings: Settings) -> list[ControllerRouterHandler]:
    """The static files always (the OpenAPI page uses them); the pages when the UI is on."""
    static = create_static_files_router(
        path=STATIC_PATH,
        directories=[HERE / "static"],
        include_in_schema=False,
        cache_control=None,
        send_as_attachment=False,
    )
    if not settings.ui:
        return [static]
    pages = Router(
        path="/",
        route_handlers=[UiController],
        guards=[signed_in],
        after_request=_after,
        exception_handlers={
            NotSignedIn: _not_signed_in,
            CsrfRefused: _error_page,
            SessionError: _error_page,
            HTTPException: _error_page,
        },
        include_in_schema=False,
    )
    return [static, pages]


def ui_state(settings: Settings) -> dict[str, object]:
    return {"ui_signer": CookieSigner(cookie_key(settings), settings.ui_session_s)}


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine)


def redoc_plugin() -> RedocRenderPlugin:
    """Redoc from this service's own static files, without Google's fonts."""
    return RedocRenderPlugin(
        js_url=f"{STATIC_PATH}/redoc.standalone.js",
        google_fonts=False,
        path=["/", "/redoc"],
        favicon=f"<link rel='icon' href='{STATIC_PATH}/favicon.svg'>",
    )

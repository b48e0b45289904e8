"""The inspector's pages: each reads or acts through `SessionService`, like the API's handlers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import jwt
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException
from litestar.params import Body, PathParameter, QueryParameter
from litestar.response import Redirect, Template
from redis.exceptions import RedisError

from sessionmgr.api import conditional, health
from sessionmgr.api.bridge import resolve, resolved
from sessionmgr.api.sessions import SESSION_ID
from sessionmgr.domain.errors import (
    AccessDenied,
    AuthenticationFailed,
    BackendUnavailable,
    SessionError,
    SessionNotFound,
)
from sessionmgr.domain.model import Principal, Session, SessionState
from sessionmgr.services.sessions import SessionService
from sessionmgr.services.views import ListOrder
from sessionmgr.storage.outbox import OutboxAdmin
from sessionmgr.ui.access import (
    CsrfRefused,
    check_form,
    form_idempotency,
    same_origin,
    signer,
    version_precondition,
)
from sessionmgr.ui.changes import FeedRelay
from sessionmgr.ui.cookie import COOKIE_NAME, SignedIn

UiRequest = Request[Principal, SignedIn, Any]
SessionId = Annotated[str, PathParameter()]
Before = Annotated[int | None, QueryParameter(ge=1)]
TIMELINE_PAGE = 20
LIST_PAGE = 20
MAX_COOKIE_CHARS = 4000  # browsers keep cookies up to 4096 bytes, name and attributes included
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
TIERS = {
    SessionState.ACTIVE: "hot (Redis)",
    SessionState.DORMANT: "warm (MongoDB)",
    SessionState.ARCHIVED: "cold (S3)",
}
FORM = Body(media_type=RequestEncodingType.URL_ENCODED)


@dataclass
class SignInForm:
    token: str = ""


@dataclass
class SignOutForm:
    csrf: str = ""


@dataclass
class ActionForm:
    csrf: str = ""
    version: int = 0
    idem: str = ""


def _sid(session_id: str) -> str:
    """Like the API: an odd id is a session that does not exist, and no backend is asked."""
    if not SESSION_ID.fullmatch(session_id):
        raise SessionNotFound(session_id[:64])
    return session_id


def _service(request: UiRequest) -> SessionService:
    service: SessionService = resolved(request, "sessions")
    return service


def _common(request: UiRequest) -> dict[str, Any]:
    return {
        "principal": request.user,
        "csrf": signer(request).csrf(request.auth),
        "form_key": secrets.token_urlsafe(18),  # one Idempotency-Key per rendered form
    }


def _pretty(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _session_context(request: UiRequest, session: Session) -> dict[str, Any]:
    return {
        **_common(request),
        "session": session,
        "tier": TIERS[session.state],
        "etag": conditional.etag(session),
        "wip": _pretty(session.work_in_progress),
        "summary": _pretty(session.context_summary),
        "may_manage": request.user.is_admin or request.user.sub == session.owner_id,
    }


async def _timeline(request: UiRequest, session: Session, before: int | None) -> dict[str, Any]:
    """One page of events, newest first, that end just before seq `before`."""
    top = max((e.seq for e in session.recent_timeline), default=0)
    end = top if before is None else min(before - 1, top)
    start = max(0, end - TIMELINE_PAGE)
    events: list[Any] = []
    if end > 0:
        page = await _service(request).timeline(
            request.user, session.id, after_seq=start, limit=end - start
        )
        events = [e for e in page.items if e.seq <= end]
        events.reverse()
    return {
        "events": [(e, _pretty(e.data)) for e in events],
        "older": start + 1 if start > 0 else None,
    }


def _secure_cookie(request: UiRequest) -> bool:
    return request.url.hostname not in LOOPBACK


class UiController(Controller):
    path = "/ui"
    include_in_schema = False

    @get("/sign-in", opt={"public": True}, name="ui-sign-in")
    async def sign_in_form(self) -> Template:
        return Template("sign_in.html.j2", context={"error": None})

    @post("/sign-in", opt={"public": True}, status_code=303)
    async def sign_in(self, request: UiRequest, data: Annotated[SignInForm, FORM]) -> Response[Any]:
        """Verify the pasted token under the API's rules; keep it in a signed cookie."""
        if not same_origin(request):
            raise CsrfRefused("sign in from this service's own page")
        token = data.token.strip()
        try:
            await resolved(request, "verifier").verify(f"Bearer {token}")
        except AuthenticationFailed as exc:
            return Template("sign_in.html.j2", context={"error": str(exc)}, status_code=401)
        value, max_age = signer(request).issue(token, _token_exp(token))
        if len(value) > MAX_COOKIE_CHARS:  # a browser would drop it without a word
            return Template(
                "sign_in.html.j2",
                context={"error": "this token is too large to keep in a cookie"},
                status_code=400,
            )
        response = Redirect("/ui", status_code=303)
        response.set_cookie(
            Cookie(
                key=COOKIE_NAME,
                value=value,
                max_age=max_age,
                path="/ui",
                httponly=True,
                secure=_secure_cookie(request),
                samesite="strict",
            )
        )
        return response

    @post("/sign-out", status_code=303)
    async def sign_out(
        self, request: UiRequest, data: Annotated[SignOutForm, FORM]
    ) -> Response[Any]:
        check_form(request, request.auth, data.csrf)
        response = Redirect("/ui/sign-in", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/ui")
        return response

    @get("/")
    async def sessions(
        self,
        request: UiRequest,
        state_filter: Annotated[SessionState | None, QueryParameter(name="state")] = None,
        order: Annotated[ListOrder, QueryParameter()] = ListOrder.RECENT,
        cursor: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> Template:
        """The sessions the principal can read: the API's list, its filters and paging."""
        service = _service(request)
        page = await service.list_sessions(
            request.user, state=state_filter, limit=LIST_PAGE, cursor=cursor, order=order
        )
        rows = []
        for item in page.items:
            participants: list[str] | None = None
            if item.state is not SessionState.ARCHIVED:  # reading one would restore it
                try:
                    participants = sorted((await service.get(request.user, item.id)).participants)
                except SessionError:
                    participants = None  # gone or moved since the list was read
            rows.append((item, participants))
        return Template(
            "list.html.j2",
            context={
                **_common(request),
                "rows": rows,
                "next_cursor": page.next_cursor,
                "request_cursor": cursor,
                "state": state_filter.value if state_filter else "",
                "order": order.value,
                "states": [s.value for s in SessionState],
            },
        )

    @get("/sessions/{session_id:str}")
    async def session_page(
        self, request: UiRequest, session_id: SessionId, before: Before = None
    ) -> Template:
        session = await _service(request).get(request.user, _sid(session_id))
        return Template(
            "session.html.j2",
            context={
                **_session_context(request, session),
                **await _timeline(request, session, before),
            },
        )

    @get("/sessions/{session_id:str}/panel")
    async def session_panel(self, request: UiRequest, session_id: SessionId) -> Response[Any]:
        """The live part of a session page; 304 while the ETag sent as If-None-Match holds."""
        session = await _service(request).get(request.user, _sid(session_id))
        tag = conditional.etag(session)
        if conditional.none_match(request.headers.get("if-none-match"), tag):
            return Response(content=b"", status_code=304, headers={"ETag": tag})
        return Template(
            "panel.html.j2",
            context={
                **_session_context(request, session),
                **await _timeline(request, session, None),
            },
            headers={"ETag": tag, "Cache-Control": "no-store"},
        )

    @get("/changes/{session_id:str}")
    async def changes(self, request: UiRequest, session_id: SessionId) -> FeedRelay:
        """The session's change feed, relayed from `/v1` (sessionmgr.ui.changes)."""
        return FeedRelay(_sid(session_id), request.auth.token)

    @get("/sessions/{session_id:str}/timeline")
    async def timeline_page(
        self, request: UiRequest, session_id: SessionId, before: Before = None
    ) -> Template:
        session = await _service(request).get(request.user, _sid(session_id))
        return Template(
            "timeline.html.j2",
            context={"session": session, **await _timeline(request, session, before)},
        )

    @post("/sessions/{session_id:str}/{action:str}", status_code=303)
    async def act(
        self,
        request: UiRequest,
        session_id: SessionId,
        action: Annotated[str, PathParameter()],
        data: Annotated[ActionForm, FORM],
    ) -> Redirect:
        """Suspend, resume or archive, at the version the page showed (If-Match)."""
        check_form(request, request.auth, data.csrf)
        sid = _sid(session_id)
        calls = {
            "suspend": _service(request).suspend,
            "resume": _service(request).resume,
            "archive": _service(request).archive,
        }
        call = calls.get(action)
        if call is None:
            raise NotFoundException(f"no action {action!r}")
        tag = conditional.version_tag(data.version)
        idem = form_idempotency(request.user, data.idem, request.url.path, tag)
        await call(request.user, sid, idem, if_match=version_precondition(data.version))
        return Redirect(f"/ui/sessions/{sid}", status_code=303)

    @post("/sessions/{session_id:str}/participants/{mad_name:str}/remove", status_code=303)
    async def remove_participant(
        self,
        request: UiRequest,
        session_id: SessionId,
        mad_name: Annotated[str, PathParameter()],
        data: Annotated[ActionForm, FORM],
    ) -> Redirect:
        check_form(request, request.auth, data.csrf)
        sid = _sid(session_id)
        tag = conditional.version_tag(data.version)
        idem = form_idempotency(request.user, data.idem, request.url.path, tag)
        await _service(request).remove_participant(
            request.user, sid, mad_name, idem, if_match=version_precondition(data.version)
        )
        return Redirect(f"/ui/sessions/{sid}", status_code=303)

    @get("/operator")
    async def operator(self, request: UiRequest) -> Template:
        """Backends, read-only mode, the outbox and the breakers: for role admin only."""
        if not request.user.is_admin:
            raise AccessDenied("the operator view is for role admin")
        container = request.app.state.container
        _, ready = await health.readiness(request.app.state)
        breakers = container.breakers()
        outbox: Any = None
        outbox_error: str | None = None
        try:
            outbox = await OutboxAdmin(await resolve(container.redis)).status(limit=20)
        except (RedisError, OSError, BackendUnavailable) as exc:  # shown: Redis may be down
            outbox_error = f"{type(exc).__name__}: {exc}"
        return Template(
            "operator.html.j2",
            context={
                **_common(request),
                "ready": ready,
                "breakers": {n: breakers[n].state.name.lower() for n in ("redis", "mongodb", "s3")},
                "outbox": outbox,
                "outbox_error": outbox_error,
                "now": datetime.now().astimezone(),
            },
        )


def _token_exp(token: str) -> float | None:
    """The verified token's exp (read after verification, so the signature already held)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None

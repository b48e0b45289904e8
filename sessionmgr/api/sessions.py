"""`/v1/sessions`: thin handlers that parse, call one service method and shape the answer."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Litestar, Request, Response, delete, get, patch, post, put
from litestar.enums import MediaType
from litestar.exceptions import ClientException
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

from sessionmgr.api.bridge import resolved
from sessionmgr.api.problems import responses
from sessionmgr.api.schemas import AppendBody, CreateSessionBody, ParticipantBody, PatchBody
from sessionmgr.domain.errors import InvalidInput, SessionNotFound, VersionRequired
from sessionmgr.domain.model import Principal, Session, SessionState
from sessionmgr.services.ports import Idempotency
from sessionmgr.services.sessions import SessionService
from sessionmgr.services.timeline import TimelinePage
from sessionmgr.services.views import AppendResult, LeaseInfo, SessionPage

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
ETAG = re.compile(r'^(?:W/)?(?:"(\d{1,18})"|(\d{1,18}))$')

Req = Request[Principal, Any, Any]
B = TypeVar("B", CreateSessionBody, PatchBody, AppendBody, ParticipantBody)
SessionId = Annotated[str, PathParameter(description="The session id (32 hex characters).")]
MadName = Annotated[str, PathParameter(description="The MAD's name, without the `mad:` prefix.")]
IdemHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        description="Repeat a mutation safely: the same key and body return the first answer.",
    ),
]
IfMatch = Annotated[
    str | None,
    HeaderParameter(name="If-Match", required=False, description='The expected version, as "<n>".'),
]
READ = (400, 401, 403, 404, 429, 503)
BODY = (400, 401, 403, 413, 415, 422, 429, 503)


def _sid(session_id: str) -> str:
    """Odd ids are simply sessions that do not exist: no backend is asked."""
    if not SESSION_ID.fullmatch(session_id):
        raise SessionNotFound(session_id[:64])
    return session_id


def _idem(request: Req, key: str | None, body: Any = None) -> Idempotency | None:
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1-255 visible ASCII characters", "Idempotency-Key"
        )
    scope = hashlib.sha256(f"{request.user.sub}\x00{key}".encode()).hexdigest()
    payload = msgspec.json.encode(body) if body is not None else b""
    fingerprint = hashlib.sha256(
        request.method.encode() + b" " + request.url.path.encode() + b"\n" + payload
    ).hexdigest()
    return Idempotency(key_digest=scope, fingerprint=fingerprint)


async def _strict(request: Req, parsed: B) -> B:
    """Decode the body again, strictly: Litestar's lenient pass would take "3" for 3.

    Litestar's typed `data` keeps the OpenAPI schema and its 400/422 answers; this pass adds
    what it lets through: wrong JSON types and a content type other than JSON.
    """
    media_type = request.content_type[0]
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ClientException(
            "send the body as application/json", status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE
        )
    try:
        return msgspec.json.decode(await request.body(), type=type(parsed))
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc)) from None


class _Answer(ASGIResponse):
    """The two ASGI messages of an answer, built in advance: `ASGIResponse.__init__` (header
    objects, checks for bodies a status cannot carry) is for the general case, not this one."""

    def __init__(self, start: HTTPResponseStartEvent, body: HTTPResponseBodyEvent) -> None:
        self._start = start
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._start)
        await send(self._body)


class SessionResponse(Response[Session]):
    """A session as JSON with its ETag, sent without Litestar's generic response machinery.

    Every read and write of a session answers with one: msgspec encodes the struct straight
    to the body (the same bytes Litestar's serializer gives a Struct), and the headers are
    written as the raw list ASGI takes (the same headers, in another order). A response that
    carries anything else (cookies, background tasks, another media type or encoders, from
    the handler or its route) goes through Litestar's own path. The handlers still declare
    `Response[Session]`, so the OpenAPI schema is Litestar's own.
    """

    def to_asgi_response(
        self, app: Litestar | None, request: Request[Any, Any, Any], **options: Any
    ) -> ASGIResponse:
        if (
            options.get("background")
            or options.get("cookies")
            or options.get("headers")
            or self.background
            or self.cookies
            or self.response_type_encoders
            or self.media_type not in (None, MediaType.JSON, "application/json")
        ):
            return super().to_asgi_response(app, request, **options)  # extras: Litestar's way
        body = msgspec.json.encode(self.content)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()),
        ]
        return _Answer(
            {"type": "http.response.start", "status": self.status_code or 200, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False},
        )


def _with_etag(session: Session, status_code: int = 200, **headers: str) -> Response[Session]:
    return SessionResponse(
        session, status_code=status_code, headers={"ETag": f'"{session.version}"', **headers}
    )


def _service(request: Req) -> SessionService:
    service: SessionService = resolved(request, "sessions")
    return service


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = ETAG.fullmatch(value.strip())
    if match is None:
        raise InvalidInput('If-Match must be a version in quotes, like "3"', "If-Match")
    return int(match.group(1) or match.group(2))


class SessionController(Controller):
    path = "/v1/sessions"
    tags = ["sessions"]
    security = [{"bearer": []}]

    @post("/", status_code=201, responses=responses(*BODY))
    async def create_session(
        self,
        request: Req,
        data: JSONBody[CreateSessionBody],
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Create a session owned by the caller (or, for admin/service, by `owner_id`)."""
        data = await _strict(request, data)
        session = await _service(request).create(
            request.user,
            owner_id=data.owner_id,
            work_in_progress=data.work_in_progress,
            context_summary=data.context_summary,
            idem=_idem(request, idempotency_key, data),
        )
        return _with_etag(session, 201, Location=f"/v1/sessions/{session.id}")

    @get("/", responses=responses(400, 401, 422, 429, 503))
    async def list_sessions(
        self,
        request: Req,
        state_filter: Annotated[SessionState | None, QueryParameter(name="state")] = None,
        limit: Annotated[
            int | None, QueryParameter(ge=1, description="Page size; larger values are capped.")
        ] = None,
        cursor: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> SessionPage:
        """The caller's sessions (owner or in the ACL; admin: all), oldest id first."""
        return await _service(request).list_sessions(
            request.user, state=state_filter, limit=limit, cursor=cursor
        )

    @get("/{session_id:str}", responses=responses(*READ, 400, 422))
    async def get_session(
        self,
        request: Req,
        session_id: SessionId,
        include: Annotated[
            str | None, QueryParameter(description="`full` adds full_context and full_timeline")
        ] = None,
    ) -> Response[Session]:
        if include not in (None, "full"):
            raise InvalidInput("include accepts only 'full'", "include")
        session = await _service(request).get(
            request.user, _sid(session_id), full=include == "full"
        )
        return _with_etag(session)

    @get("/{session_id:str}/timeline", responses=responses(*READ, 422))
    async def read_timeline(
        self,
        request: Req,
        session_id: SessionId,
        after_seq: Annotated[
            int, QueryParameter(ge=0, description="Events after this seq (0: from the start).")
        ] = 0,
        limit: Annotated[
            int | None,
            QueryParameter(ge=1, description="Page size (default 100); larger values are capped."),
        ] = None,
    ) -> TimelinePage:
        """The timeline, oldest first, a page at a time: continue with `next_after_seq`."""
        return await _service(request).timeline(
            request.user, _sid(session_id), after_seq=after_seq, limit=limit
        )

    @patch("/{session_id:str}", responses=responses(*BODY, 404, 409, 428))
    async def update_session(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[PatchBody],
        if_match: IfMatch = None,
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Apply a patch at `expected_version` (or If-Match); stale versions get 409."""
        data = await _strict(request, data)
        header_version = _if_match(if_match)
        expected = data.expected_version or header_version
        if expected is None:
            raise VersionRequired()
        if header_version is not None and data.expected_version not in (None, header_version):
            raise InvalidInput("expected_version and If-Match disagree", "expected_version")
        session = await _service(request).update(
            request.user,
            _sid(session_id),
            expected_version=expected,
            patch=data.patch,
            idem=_idem(request, idempotency_key, data),
        )
        return _with_etag(session)

    @post("/{session_id:str}/timeline", status_code=200, responses=responses(*BODY, 404, 409))
    async def append_timeline(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[AppendBody],
        idempotency_key: IdemHeader = None,
    ) -> AppendResult:
        """Append events; the server assigns seq, at and actor."""
        data = await _strict(request, data)
        return await _service(request).append(
            request.user,
            _sid(session_id),
            data.events,
            expected_version=data.expected_version,
            idem=_idem(request, idempotency_key, data),
        )

    @post("/{session_id:str}/participants", status_code=200, responses=responses(*BODY, 404, 409))
    async def add_participant(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[ParticipantBody],
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Add a MAD: it joins the ACL and gets a lease it must renew."""
        data = await _strict(request, data)
        session = await _service(request).add_participant(
            request.user, _sid(session_id), data.mad_name, _idem(request, idempotency_key, data)
        )
        return _with_etag(session)

    @put("/{session_id:str}/participants/{mad_name:str}/lease", responses=responses(*READ, 422))
    async def renew_lease(
        self, request: Req, session_id: SessionId, mad_name: MadName
    ) -> LeaseInfo:
        return await _service(request).renew_lease(request.user, _sid(session_id), mad_name)

    @delete("/{session_id:str}/participants/{mad_name:str}", responses=responses(*READ, 409, 422))
    async def remove_participant(
        self,
        request: Req,
        session_id: SessionId,
        mad_name: MadName,
        idempotency_key: IdemHeader = None,
    ) -> None:
        await _service(request).remove_participant(
            request.user, _sid(session_id), mad_name, _idem(request, idempotency_key)
        )

    @post("/{session_id:str}/suspend", status_code=200, responses=responses(*READ, 409, 422))
    async def suspend_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Flush to MongoDB and leave Redis; the session reads the same, now `dormant`."""
        session = await _service(request).suspend(
            request.user, _sid(session_id), _idem(request, idempotency_key)
        )
        return _with_etag(session)

    @post("/{session_id:str}/resume", status_code=200, responses=responses(*READ, 422))
    async def resume_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        session = await _service(request).resume(
            request.user, _sid(session_id), _idem(request, idempotency_key)
        )
        return _with_etag(session)

    @post("/{session_id:str}/archive", status_code=200, responses=responses(*READ, 409, 422))
    async def archive_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Move the session to S3, leaving a stub (owner or admin); an active one is suspended
        first. A later read brings it back."""
        session = await _service(request).archive(
            request.user, _sid(session_id), _idem(request, idempotency_key)
        )
        return _with_etag(session)

    @delete("/{session_id:str}", responses=responses(*READ, 422))
    async def delete_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
    ) -> None:
        """Remove the session from every tier (owner or admin)."""
        await _service(request).delete(
            request.user, _sid(session_id), _idem(request, idempotency_key)
        )

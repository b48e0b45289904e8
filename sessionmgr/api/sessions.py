"""`/v1/sessions`: thin handlers that parse, call one service method and shape the answer."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar, cast

import msgspec
from litestar import (
    Controller,
    HttpMethod,
    Litestar,
    Request,
    Response,
    delete,
    get,
    patch,
    post,
    put,
    route,
)
from litestar.datastructures import ResponseHeader
from litestar.enums import MediaType
from litestar.exceptions import ClientException
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

from sessionmgr.api import conditional
from sessionmgr.api.answer import session_answer
from sessionmgr.api.bridge import resolved
from sessionmgr.api.conditional import etag
from sessionmgr.api.lane import handed_over_error
from sessionmgr.api.problems import responses, validation_errors
from sessionmgr.api.schemas import AppendBody, CreateSessionBody, ParticipantBody, PatchBody
from sessionmgr.api.write_headers import idempotency
from sessionmgr.api.write_headers import lease_token as _lease_token
from sessionmgr.domain.errors import InvalidInput, SessionNotFound, VersionRequired
from sessionmgr.domain.model import Principal, Session, SessionState
from sessionmgr.services.ports import Idempotency
from sessionmgr.services.sessions import SessionService
from sessionmgr.services.timeline import TimelinePage
from sessionmgr.services.views import (
    AppendResult,
    ArchivedSession,
    LeaseInfo,
    ListOrder,
    SessionPage,
)

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
MERGE_PATCH = "application/merge-patch+json"

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
    HeaderParameter(
        name="If-Match",
        required=False,
        description='Apply only at this version: an ETag of the session (`"7"`, `"7-…"`), a '
        "list of them, or `*` (the session exists). A stale one is a 412 and changes nothing.",
    ),
]
IfNoneMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-None-Match",
        required=False,
        description="The ETag of the copy you hold: 304 without a body while it is current.",
    ),
]
LeaseTokenHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Lease-Token",
        required=False,
        description="A MAD's fencing token (from its join): a write with an older one is "
        "409 `fenced`. Without it a MAD's write is accepted while its lease is alive.",
    ),
]
READ = (400, 401, 403, 404, 429, 503)
BODY = (400, 401, 403, 413, 415, 422, 429, 503)
WRITE = (*READ, 412, 422)  # a write on a session: If-Match may fail


def _sid(session_id: str) -> str:
    """Odd ids are simply sessions that do not exist: no backend is asked."""
    if not SESSION_ID.fullmatch(session_id):
        raise SessionNotFound(session_id[:64])
    return session_id


def _idem(request: Req, key: str | None, body: Any = None) -> Idempotency | None:
    if_match = request.headers.get("if-match", "")
    return idempotency(request.user.sub, key, request.method, request.url.path, if_match, body)


async def _strict_or_default(request: Req, default: CreateSessionBody) -> CreateSessionBody:
    """A create's body, or `default` when it has none (every member is optional)."""
    if not await request.body():
        return default
    return await _strict(request, default)


async def _strict(request: Req, parsed: B) -> B:
    """Decode the body again, strictly: Litestar's lenient pass would take "3" for 3.

    Litestar's typed `data` keeps the OpenAPI schema and its 400/422 answers; this pass adds
    what it lets through: wrong JSON types and a content type other than JSON (other `+json`
    types are not JSON this API reads; a merge patch goes through `_merge_patch`).
    """
    media_type = request.content_type[0]
    if media_type != "application/json":
        raise ClientException(
            "send the body as application/json", status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE
        )
    try:
        return msgspec.json.decode(await request.body(), type=type(parsed))
    except msgspec.ValidationError as exc:
        error = validation_errors(str(exc))[0]
        raise InvalidInput(error.message, error.field) from None


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
        return _Answer(
            *session_answer(self.content, self.status_code or 200, self.headers, request.method)
        )


def _with_etag(
    session: Session, status_code: int = 200, *, full: bool = False, **headers: str
) -> Response[Session]:
    return SessionResponse(
        session, status_code=status_code, headers={"ETag": etag(session, full=full), **headers}
    )


def _not_modified(tag: str) -> Response[Session]:
    """304: no body, the ETag the client already holds (RFC 9110 §15.4.5)."""
    return cast("Response[Session]", Response(content=b"", status_code=304, headers={"ETag": tag}))


def _service(request: Req) -> SessionService:
    service: SessionService = resolved(request, "sessions")
    return service


def _head_or(name: str) -> Any:
    """operationIds for a route that serves GET and HEAD: `getSession`, `headSession`."""

    def operation_id(handler: Any, method: str, path: Any) -> str:
        return ("head" + name[3:]) if method == "HEAD" else name

    return operation_id


SESSION_HEADERS = [
    ResponseHeader(
        name="ETag",
        documentation_only=True,
        description="The entity tag of this representation; send it back as If-Match or "
        "If-None-Match.",
    ),
]
GET_HEAD = [HttpMethod.GET, HttpMethod.HEAD]


async def _merge_patch(request: Req) -> Response[Session] | None:
    """PATCH with `application/merge-patch+json`: RFC 7396 on the session's mutable fields.

    Runs before Litestar decodes the body into the plain patch's shape. The document holds
    the changes only, so the version comes from If-Match (428 without one).
    """
    if request.content_type[0] != MERGE_PATCH:
        return None  # the plain patch: the handler's own path
    session_id = _sid(request.path_params["session_id"])
    precondition = conditional.if_match(request.headers.get("if-match"))
    if precondition is None:
        raise VersionRequired()
    document = msgspec.json.decode(await request.body())
    session = await _service(request).merge_update(
        request.user,
        session_id,
        expected_version=None,
        if_match=precondition,
        document=document,
        idem=_idem(request, request.headers.get("idempotency-key"), document),
        lease_token=_lease_token(request.headers.get("lease-token")),
    )
    return _with_etag(session)


async def _read_session(
    request: Req, session_id: str, include: str | None, if_none_match: str | None
) -> Response[Session]:
    """`get_session`'s answer (and `_plain_read`'s)."""
    if include not in (None, "full"):
        raise InvalidInput("include accepts only 'full'", "include")
    full = include == "full"
    session = await _service(request).get(request.user, _sid(session_id), full=full)
    tag = etag(session, full=full)
    if conditional.none_match(if_none_match, tag):
        return _not_modified(tag)
    return _with_etag(session, full=full)


async def _handed_over(request: Req) -> None:
    """A lane's error for this request, if it handed one over: answered the whole way, and
    never read or appended again (sessionmgr/api/lane.py, append_lane.py)."""
    if (failed := handed_over_error(request.scope)) is not None:
        raise failed


async def _plain_read(request: Req) -> Response[Session] | None:
    """A GET or HEAD of a session with no query string and no If-None-Match (nearly every
    read), answered before Litestar extracts `get_session`'s arguments: they would all be
    their defaults (`include` and `if_none_match` None) and the path's `session_id`, and the
    extraction (the headers parsed into a `Headers`, the query string, the signature model)
    is most of what Litestar spends on a read. Any other read goes to `get_session` (None)."""
    await _handed_over(request)  # the read lane's error: answer it
    scope = request.scope
    if scope["query_string"] or any(
        name == b"if-none-match" or name.lower() == b"if-none-match" for name, _ in scope["headers"]
    ):
        return None
    return await _read_session(request, request.path_params["session_id"], None, None)


class SessionController(Controller):
    path = "/v1/sessions"
    tags = ["sessions"]
    security = [{"bearer": []}]

    @post(
        "/",
        status_code=201,
        responses=responses(*BODY),
        operation_id="createSession",
        summary="Create a session",
        response_headers=[
            *SESSION_HEADERS,
            ResponseHeader(
                name="Location", documentation_only=True, description="The new session's URL."
            ),
        ],
    )
    async def create_session(
        self,
        request: Req,
        data: JSONBody[CreateSessionBody | None] = None,
        idempotency_key: IdemHeader = None,
    ) -> Response[Session]:
        """Create a session owned by the caller (or, for roles admin and service, by
        `owner_id`). Every member of the body is optional: no body at all creates an empty
        session owned by the caller."""
        data = await _strict_or_default(request, CreateSessionBody())
        session = await _service(request).create(
            request.user,
            owner_id=data.owner_id,
            work_in_progress=data.work_in_progress,
            context_summary=data.context_summary,
            idem=_idem(request, idempotency_key, data),
        )
        return _with_etag(session, 201, Location=f"/v1/sessions/{session.id}")

    @get(
        "/",
        responses=responses(400, 401, 422, 429, 503),
        operation_id="listSessions",
        summary="List the caller's sessions",
    )
    async def list_sessions(
        self,
        request: Req,
        state_filter: Annotated[SessionState | None, QueryParameter(name="state")] = None,
        limit: Annotated[
            int | None, QueryParameter(ge=1, description="Page size; larger values are capped.")
        ] = None,
        cursor: Annotated[
            str | None,
            QueryParameter(
                max_length=200, description="`next_cursor` of the previous page, as it came."
            ),
        ] = None,
        order: Annotated[
            ListOrder,
            QueryParameter(
                description="`id` (default): by session id, a stable order for a full walk. "
                "`recent`: most recently active first."
            ),
        ] = ListOrder.ID,
    ) -> SessionPage:
        """The sessions the caller owns or is in the ACL of (admin: all), as summaries, one
        page at a time. A walk that follows `next_cursor` lists every session that did not
        change meanwhile exactly once, in either order; with `order=recent` a session that
        becomes active during the walk moves to the front, where the next walk finds it."""
        return await _service(request).list_sessions(
            request.user, state=state_filter, limit=limit, cursor=cursor, order=order
        )

    @route(
        "/{session_id:str}",
        http_method=GET_HEAD,
        responses=responses(*READ, 400, 422),
        operation_id=_head_or("getSession"),
        summary="Read a session",
        response_headers=SESSION_HEADERS,
        before_request=_plain_read,
    )
    async def get_session(
        self,
        request: Req,
        session_id: SessionId,
        include: Annotated[
            str | None, QueryParameter(description="`full` adds full_context and full_timeline")
        ] = None,
        if_none_match: IfNoneMatch = None,
    ) -> Response[Session]:
        """The session as it is now, with its ETag. Send the ETag back as If-None-Match to get
        304 Not Modified (no body) while nothing changed; lease state counts as a change.
        HEAD answers the same headers without the body. An archived session is brought back
        from S3 first (it then reads as `dormant`)."""
        return await _read_session(request, session_id, include, if_none_match)

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

    @patch(
        "/{session_id:str}",
        responses=responses(*BODY, 404, 409, 412, 428),
        before_request=_merge_patch,
        operation_id="updateSession",
        summary="Change a session's fields",
        response_headers=SESSION_HEADERS,
    )
    async def update_session(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[PatchBody],
        if_match: IfMatch = None,
        idempotency_key: IdemHeader = None,
        lease_token: LeaseTokenHeader = None,
    ) -> Response[Session]:
        """Replace each top-level field the patch names (`work_in_progress`,
        `context_summary`, `full_context`). Say which version the patch applies to with
        `expected_version` in the body (stale: 409 with `current_version`) or `If-Match`
        (stale: 412); with neither, 428.

        With `Content-Type: application/merge-patch+json` the body is an RFC 7396 merge
        patch of `work_in_progress` and `context_summary` instead (nested keys; `null`
        removes one), and If-Match gives the version."""
        data = await _strict(request, data)
        precondition = conditional.if_match(if_match)
        if data.expected_version is None and precondition is None:
            raise VersionRequired()
        session = await _service(request).update(
            request.user,
            _sid(session_id),
            expected_version=data.expected_version,
            patch=data.patch,
            idem=_idem(request, idempotency_key, data),
            lease_token=_lease_token(lease_token),
            if_match=precondition,
        )
        return _with_etag(session)

    @post(
        "/{session_id:str}/timeline",
        status_code=200,
        responses=responses(*BODY, 404, 409, 412),
        operation_id="appendTimeline",
        # Litestar runs only the innermost `before_request`: one set on the controller or the
        # app would not run here, and this one must (the append lane's hand-over).
        before_request=_handed_over,
        summary="Append events to the timeline",
    )
    async def append_timeline(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[AppendBody],
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> AppendResult:
        """Append events; the server assigns each its `seq` (gap-free), `at` and `actor` (the
        caller). Optional `expected_version` (409 when stale) or `If-Match` (412)."""
        data = await _strict(request, data)
        return await _service(request).append(
            request.user,
            _sid(session_id),
            data.events,
            expected_version=data.expected_version,
            idem=_idem(request, idempotency_key, data),
            lease_token=_lease_token(lease_token),
            if_match=conditional.if_match(if_match),
        )

    @post(
        "/{session_id:str}/participants",
        status_code=200,
        responses=responses(*BODY, 404, 409, 412),
        operation_id="addParticipant",
        summary="Add a MAD to the session",
        response_headers=SESSION_HEADERS,
    )
    async def add_participant(
        self,
        request: Req,
        session_id: SessionId,
        data: JSONBody[ParticipantBody],
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> Response[Session]:
        """Add a MAD (owner, admin or the participants role), or rejoin as that MAD: it joins
        the ACL with a lease it must renew and a fencing token (`participants.<name>.token`).
        A dormant session answers 409 `dormant`: resume it first."""
        _lease_token(lease_token)  # checked like any header, even where unused
        data = await _strict(request, data)
        session = await _service(request).add_participant(
            request.user,
            _sid(session_id),
            data.mad_name,
            _idem(request, idempotency_key, data),
            if_match=conditional.if_match(if_match),
        )
        return _with_etag(session)

    @put(
        "/{session_id:str}/participants/{mad_name:str}/lease",
        responses=responses(*WRITE, 409),
        operation_id="renewLease",
        summary="Renew a participant's lease",
    )
    async def renew_lease(
        self,
        request: Req,
        session_id: SessionId,
        mad_name: MadName,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
        idempotency_key: IdemHeader = None,
    ) -> LeaseInfo:
        """Extend a live lease (the MAD itself, or who manages participants); the token stays.
        A lapsed lease is 409 `lease-expired` (rejoin), a dormant session 409 `dormant`."""
        return await _service(request).renew_lease(
            request.user,
            _sid(session_id),
            mad_name,
            _lease_token(lease_token),
            _idem(request, idempotency_key),
            if_match=conditional.if_match(if_match),
        )

    @delete(
        "/{session_id:str}/participants/{mad_name:str}",
        responses=responses(*WRITE, 409),
        operation_id="removeParticipant",
        summary="Remove a participant",
    )
    async def remove_participant(
        self,
        request: Req,
        session_id: SessionId,
        mad_name: MadName,
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> None:
        """Remove a participant at once (owner, admin or the participants role), or leave as
        that MAD; 404 when it is not (or no longer) a participant (a retry with the same
        Idempotency-Key gets the first 204)."""
        await _service(request).remove_participant(
            request.user,
            _sid(session_id),
            mad_name,
            _idem(request, idempotency_key),
            _lease_token(lease_token),
            if_match=conditional.if_match(if_match),
        )

    @post(
        "/{session_id:str}/suspend",
        status_code=200,
        responses=responses(*WRITE, 409),
        operation_id="suspendSession",
        summary="Suspend a session to MongoDB",
        response_headers=SESSION_HEADERS,
    )
    async def suspend_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> Response[Session]:
        """Flush to MongoDB and leave Redis; the session reads the same, now `dormant`, and
        every lease ends."""
        _lease_token(lease_token)  # checked like any header, even where unused
        session = await _service(request).suspend(
            request.user,
            _sid(session_id),
            _idem(request, idempotency_key),
            if_match=conditional.if_match(if_match),
        )
        return _with_etag(session)

    @post(
        "/{session_id:str}/resume",
        status_code=200,
        responses=responses(*WRITE),
        operation_id="resumeSession",
        summary="Resume a session into Redis",
        response_headers=SESSION_HEADERS,
    )
    async def resume_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> Response[Session]:
        """Load a dormant (or archived) session back into Redis: `active`, same version."""
        _lease_token(lease_token)  # checked like any header, even where unused
        session = await _service(request).resume(
            request.user,
            _sid(session_id),
            _idem(request, idempotency_key),
            if_match=conditional.if_match(if_match),
        )
        return _with_etag(session)

    @post(
        "/{session_id:str}/archive",
        status_code=200,
        responses=responses(*WRITE, 409),
        operation_id="archiveSession",
        summary="Archive a session to S3",
        response_headers=SESSION_HEADERS,
    )
    async def archive_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> Response[ArchivedSession]:
        """Move the session's body to S3, leaving a stub (owner or admin); an active one is
        suspended first. The answer is the stub: where the body is (`archive`: object key,
        size, SHA-256, when) and `body_archived: true`; a GET brings the body back."""
        _lease_token(lease_token)  # checked like any header, even where unused
        stub = await _service(request).archive(
            request.user,
            _sid(session_id),
            _idem(request, idempotency_key),
            if_match=conditional.if_match(if_match),
        )
        return Response(stub, headers={"ETag": conditional.version_tag(stub.version)})

    @delete(
        "/{session_id:str}",
        responses=responses(*WRITE),
        operation_id="deleteSession",
        summary="Delete a session everywhere",
    )
    async def delete_session(
        self,
        request: Req,
        session_id: SessionId,
        idempotency_key: IdemHeader = None,
        if_match: IfMatch = None,
        lease_token: LeaseTokenHeader = None,
    ) -> None:
        """Remove the session from every tier, S3 included (owner or admin)."""
        _lease_token(lease_token)  # checked like any header, even where unused
        await _service(request).delete(
            request.user,
            _sid(session_id),
            _idem(request, idempotency_key),
            if_match=conditional.if_match(if_match),
        )

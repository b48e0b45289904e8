"""`GET /v1/sessions/{id}/changes`: the session's change feed as Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from sessionmgr.api.bridge import resolved
from sessionmgr.api.problems import responses
from sessionmgr.api.sessions import READ, SessionId, _sid
from sessionmgr.domain.errors import InvalidInput
from sessionmgr.domain.model import Principal
from sessionmgr.services.sessions import SessionService
from sessionmgr.storage.feed_hub import POSITION, FeedHub, FeedItem

Req = Request[Principal, Any, Any]


class ChangesController(Controller):
    path = "/v1/sessions"
    tags = ["sessions"]
    security = [{"bearer": []}]

    @get(
        "/{session_id:str}/changes",
        responses=responses(*READ, 422),
        operation_id="watchSession",
        summary="Follow a session's committed changes (Server-Sent Events)",
        media_type="text/event-stream",
    )
    async def changes(
        self,
        request: Req,
        session_id: SessionId,
        since: Annotated[
            str | None,
            QueryParameter(
                max_length=41, description="Resume after this event `id` (as Last-Event-ID)."
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID",
                required=False,
                description="Resume after this event `id`; wins over `since`.",
            ),
        ] = None,
    ) -> ServerSentEvent:
        """Every committed change of the session, one event each, in commit order: `patched`,
        `appended`, `joined`, `left`, `lapsed`, `suspended`, `resumed`, `archived`,
        `deleted`. Resume with `Last-Event-ID` (or `?since=`): exactly the events after it.
        When that position is no longer kept, one `reset` comes first: read the session
        again. Comments (`: ping`) keep an idle stream open."""
        position = last_event_id or since
        if position is not None and not POSITION.fullmatch(position):
            field = "Last-Event-ID" if last_event_id else "since"
            raise InvalidInput("an event id is two numbers joined by '-' (1700000000000-0)", field)
        sid = _sid(session_id)
        service: SessionService = resolved(request, "sessions")
        session = await service.get(request.user, sid)  # read access, or 403 / 404
        hub: FeedHub = resolved(request, "feed")
        sub, first = await hub.open(sid, request.user.sub, position, session.version)
        settings = request.app.state.container.settings()
        return ServerSentEvent(
            _messages(hub.events(sub, first)),
            retry_duration=settings.feed_retry_ms,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


async def _messages(items: AsyncIterator[FeedItem | None]) -> AsyncIterator[ServerSentEventMessage]:
    async for item in items:
        if item is None:
            yield ServerSentEventMessage(data=None, comment="ping")
        else:
            yield ServerSentEventMessage(data=item.data, event=item.kind, id=item.id)

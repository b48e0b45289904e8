"""`SessionResponse` sends what Litestar's generic response would: the same body bytes and
headers, with only the machinery around them skipped."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Response
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import Cookie
from litestar.serialization import encode_json
from litestar.testing import RequestFactory

from sessionmgr.api.conditional import etag
from sessionmgr.api.sessions import SessionResponse, _with_etag
from sessionmgr.services.views import to_session
from tests.unit.factories import SessionRecordFactory, TimelineEventFactory


async def _sent(response: Response[Any]) -> tuple[int, dict[bytes, bytes], bytes]:
    request = RequestFactory().get("/v1/sessions/x")
    asgi = response.to_asgi_response(None, request)
    messages: list[Any] = []

    async def send(message: Any) -> None:
        messages.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    await asgi(request.scope, receive, send)
    start, body = messages
    assert body["type"] == "http.response.body" and not body.get("more_body")
    return start["status"], dict(start["headers"]), body["body"]


async def test_it_sends_litestars_bytes_and_headers_for_a_session() -> None:
    record = SessionRecordFactory.build(work_in_progress={"ünï": [1, 2.5, None, "x"]})
    session = to_session(
        record, TimelineEventFactory.batch(2), {"mad:a": 12_000}, datetime.now(UTC)
    )
    ours = _with_etag(session, 201, Location=f"/v1/sessions/{session.id}")
    generic = Response(
        session,
        status_code=201,
        headers={"ETag": etag(session), "Location": f"/v1/sessions/{session.id}"},
    )

    assert isinstance(ours, SessionResponse)
    status, headers, body = await _sent(ours)
    generic_status, generic_headers, generic_body = await _sent(generic)

    assert body == generic_body == encode_json(session)
    assert status == generic_status == 201
    assert headers == generic_headers
    assert headers[b"etag"] == etag(session).encode()
    assert headers[b"content-length"] == str(len(body)).encode()


async def test_anything_beyond_a_plain_json_answer_goes_through_litestar() -> None:
    """Found in review: cookies, a background task or another media type on the response
    itself were dropped by the fast path."""
    session = to_session(SessionRecordFactory.build(), [], {}, datetime.now(UTC))
    ran: list[bool] = []

    async def note() -> None:
        ran.append(True)

    ours = SessionResponse(
        session,
        headers={"ETag": '"1"'},
        cookies=[Cookie(key="k", value="v")],
        media_type="application/vnd.x+json",
        background=BackgroundTask(note),
    )
    _, headers, body = await _sent(ours)

    assert headers[b"content-type"] == b"application/vnd.x+json"
    assert headers[b"set-cookie"].startswith(b"k=v")
    assert body == encode_json(session)
    assert ran == [True]

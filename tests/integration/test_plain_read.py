"""A GET or HEAD of a session with no query string and no If-None-Match is answered before
Litestar extracts the handler's arguments (sessions.py `_plain_read`): the very answer the
handler gives, ETag, errors and all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from litestar._kwargs.kwargs_model import KwargsModel

from tests.integration.session_api import create_session

Headers = Callable[..., dict[str, str]]
# Through `get_session` with its arguments extracted: an If-None-Match no session matches.
NO_MATCH = {"If-None-Match": '"no-such-tag"'}


def _answer(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k != "x-request-id"}
    return response.status_code, headers, response.content


@pytest.fixture
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts Litestar's argument extractions (one per handler call that takes arguments)."""
    calls: list[int] = []
    to_kwargs = KwargsModel.to_kwargs

    async def counted(self: KwargsModel, connection: Any) -> Any:
        calls.append(1)
        return await to_kwargs(self, connection)

    monkeypatch.setattr(KwargsModel, "to_kwargs", counted)
    return calls


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_plain_read_is_the_handlers_answer_without_its_argument_extraction(
    api: httpx.AsyncClient, auth: Headers, extractions: list[int], method: str
) -> None:
    sid = (await create_session(api, auth(), work_in_progress={"step": 1}))["id"]
    extractions.clear()

    plain = await api.request(method, f"/v1/sessions/{sid}", headers=auth())
    assert extractions == []
    full_path = await api.request(method, f"/v1/sessions/{sid}", headers=auth(**NO_MATCH))
    assert extractions == [1]

    assert plain.status_code == 200
    assert plain.headers["etag"]
    assert _answer(plain) == _answer(full_path)


@pytest.mark.parametrize(
    ("path", "who"),
    [
        ("/v1/sessions/{sid}", "mallory"),  # not the owner, not in the ACL
        ("/v1/sessions/{other}", "alice"),  # no such session
        ("/v1/sessions/not-an-id", "alice"),  # no such id
    ],
)
async def test_a_refused_plain_read_is_the_handlers_refusal(
    api: httpx.AsyncClient, auth: Headers, path: str, who: str
) -> None:
    sid = (await create_session(api, auth()))["id"]
    url = path.format(sid=sid, other="0" * 32)

    plain = await api.get(url, headers=auth(who))
    full_path = await api.get(url, headers=auth(who, **NO_MATCH))

    assert plain.status_code in (403, 404)
    assert plain.headers["content-type"] == "application/problem+json"
    assert _answer(plain) == _answer(full_path)


async def test_a_read_with_a_query_or_if_none_match_takes_the_handlers_path(
    api: httpx.AsyncClient, auth: Headers, extractions: list[int]
) -> None:
    sid = (await create_session(api, auth()))["id"]
    tag = (await api.get(f"/v1/sessions/{sid}", headers=auth())).headers["etag"]
    extractions.clear()

    assert (await api.get(f"/v1/sessions/{sid}?include=full", headers=auth())).status_code == 200
    not_modified = await api.get(f"/v1/sessions/{sid}", headers=auth(**{"If-None-Match": tag}))
    assert not_modified.status_code == 304
    bad = await api.get(f"/v1/sessions/{sid}?include=all", headers=auth())
    assert bad.status_code == 422
    assert extractions == [1, 1, 1]

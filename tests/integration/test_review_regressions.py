"""Defects a review found, each kept from coming back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from sessionmgr.container import build_container
from sessionmgr.settings import load_settings
from tests.conftest import JWT_SECRET
from tests.integration.conftest import serving
from tests.integration.session_api import append_events, create_session

Headers = dict[str, str]


async def test_concurrent_suspends_do_not_starve_a_small_pool(
    redis_url: str, auth: Callable[..., Headers]
) -> None:
    """Suspend reads the outbox on its WATCH connection, never a second pooled one."""
    settings = load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri="mongomock://",
        jwt_secret=JWT_SECRET,
        redis_pool_size=4,
    )
    async with serving(build_container(settings, write_behind=False)) as api:
        h = auth()
        ids = [(await create_session(api, h))["id"] for _ in range(4)]
        for sid in ids:  # a backlog, so that every suspend scans the outbox
            await append_events(api, h, sid, {"kind": "note"})
        answers = await asyncio.gather(
            *(api.post(f"/v1/sessions/{sid}/suspend", headers=h) for sid in ids)
        )
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("participants", {"mad_name": "bot\n"}),
        ("timeline", {"events": [{"kind": "note\n"}]}),
    ],
)
async def test_a_trailing_newline_is_not_a_valid_name(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers], path: str, body: dict[str, object]
) -> None:
    sid = (await create_session(manual_api, auth()))["id"]
    answer = await manual_api.post(f"/v1/sessions/{sid}/{path}", json=body, headers=auth())
    assert answer.status_code == 422, answer.text
    got = await manual_api.get(f"/v1/sessions/{sid}%0A", headers=auth())
    assert got.status_code == 404

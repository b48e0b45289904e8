"""The inspector against an in-process app (real redis-server, in-memory MongoDB)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
from litestar.testing import AsyncTestClient

from sessionmgr.app import create_app
from sessionmgr.container import Container

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ORIGIN = "https://testserver.local"


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, html[:500]
    return found.group(1)


@pytest_asyncio.fixture
async def ui(container: Container) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(container), base_url=ORIGIN) as test_client:
        yield test_client


@pytest_asyncio.fixture
async def sign_in(ui: AsyncTestClient[Any], token: Callable[..., str]) -> Callable[..., Any]:
    """Sign `ui` in as `sub`; returns the CSRF token of the sign-in."""

    async def run(sub: str = "alice", roles: tuple[str, ...] = ()) -> str:
        ui.cookies.clear()
        response = await ui.post(
            "/ui/sign-in",
            data={"token": token(sub, roles)},
            headers={"Origin": ORIGIN},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        page = await ui.get("/ui")
        assert page.status_code == 200, page.text
        return csrf_of(page.text)

    return run

"""`sessionmgr dev` on a machine without redis-server: the in-process Redis carries the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from litestar.testing import AsyncTestClient

from sessionmgr import devstack
from sessionmgr.app import create_app
from sessionmgr.container import build_container
from sessionmgr.settings import load_settings
from tests.conftest import JWT_SECRET


@pytest.fixture
def in_process_redis() -> Iterator[devstack.InProcessRedis]:
    redis = devstack.InProcessRedis().start()
    yield redis
    redis.cleanup()


def test_dev_picks_the_in_process_redis_without_redis_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devstack.shutil, "which", lambda _name: None)
    redis = devstack.private_redis()
    try:
        assert isinstance(redis, devstack.InProcessRedis)
        assert "fakeredis" in devstack.banner("http://x", load_settings({}), redis)
    finally:
        redis.cleanup()


async def test_the_api_works_on_the_in_process_redis(
    in_process_redis: devstack.InProcessRedis, auth: Callable[..., dict[str, str]]
) -> None:
    settings = load_settings(
        {}, redis_url=in_process_redis.url, mongodb_uri="mongomock://", jwt_secret=JWT_SECRET
    )
    async with AsyncTestClient(app=create_app(build_container(settings))) as client:
        created = await client.post("/v1/sessions", json={}, headers=auth())
        sid = created.json()["id"]
        body = {"expected_version": 1, "patch": {"work_in_progress": {"step": 2}}}
        assert (await client.patch(f"/v1/sessions/{sid}", json=body, headers=auth())).is_success
        stale = await client.patch(f"/v1/sessions/{sid}", json=body, headers=auth())
        assert stale.status_code == 409
        await client.post(
            f"/v1/sessions/{sid}/participants", json={"mad_name": "p"}, headers=auth()
        )
        got = (await client.get(f"/v1/sessions/{sid}", headers=auth())).json()
        assert got["version"] == 3
        assert got["participants"]["p"]["active"] is True

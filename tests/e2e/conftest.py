"""E2E helpers: one real app per test module, unique principals per test, problem checks.

The app (real redis-server, in-memory MongoDB, the write-behind worker) starts once per module:
stopping the worker waits out its blocking XREADGROUP, which per test would cost a second each.
Tests stay independent because every test makes its own principals and sessions.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis as redis_sync
from litestar.testing import AsyncTestClient

from sessionmgr.app import create_app
from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage.hot import hot_key
from tests.conftest import JWT_SECRET, TEST_PARTITIONS
from tests.e2e.served import check_problem
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3_BUCKET, S3Server

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def e2e_settings(redis_server: RedisServer, s3_server: S3Server) -> Settings:
    if redis_server.process is None:  # another test stopped it
        redis_server.start()
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
    return load_settings(
        {},
        redis_url=redis_server.url,
        mongodb_uri="mongomock://",
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
        outbox_claim_idle_ms=1000,
        redis_partitions=TEST_PARTITIONS,
    )


@pytest.fixture(scope="module")
def e2e_container(e2e_settings: Settings) -> Container:
    return build_container(e2e_settings)


async def _one_problem_shape(response: httpx.Response) -> None:
    """Every error answer the e2e suite meets, asserted on or not, has the one problem shape."""
    if response.status_code >= 400 and response.request.method != "HEAD":
        await response.aread()
        check_problem(response)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(e2e_container: Container) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(e2e_container)) as test_client:
        test_client.event_hooks["response"].append(_one_problem_shape)
        yield test_client


@pytest.fixture(scope="module")
def raw_redis(e2e_settings: Settings) -> Iterator[redis_sync.Redis]:
    """A side door to look at the hot tier: a stranger's call must not load a session there."""
    with redis_sync.Redis.from_url(e2e_settings.redis_url) as r:
        yield r


@dataclass(frozen=True)
class Cast:
    """The principals of one test, unique so that tests sharing an app never see each other."""

    owner: str
    mad: str  # the MAD's name; its principal is `mad:<mad>`
    other_mad: str
    stranger: str
    admin: str

    @property
    def member(self) -> str:
        return f"mad:{self.mad}"

    @property
    def other_member(self) -> str:
        return f"mad:{self.other_mad}"


@pytest.fixture
def cast() -> Cast:
    tag = secrets.token_hex(4)
    return Cast(
        owner=f"alice-{tag}",
        mad=f"planner-{tag}",
        other_mad=f"critic-{tag}",
        stranger=f"mallory-{tag}",
        admin=f"root-{tag}",
    )


def assert_problem(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """An RFC 9457 answer with the expected status; returns the problem body."""
    wanted = status if isinstance(status, tuple) else (status,)
    assert response.status_code in wanted, (response.status_code, response.text[:500])
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith(PROBLEM_JSON), (content_type, response.text[:500])
    body = check_problem(response)  # the one problem shape, for every error of the suite
    assert isinstance(body.get("title"), str), body
    assert body["title"], body
    return body


class Api:
    """The calls a test repeats, as one user would make them."""

    def __init__(self, client: AsyncTestClient[Any], auth: Callable[..., dict[str, str]]) -> None:
        self.client = client
        self.auth = auth

    def h(self, sub: str | None, roles: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
        """Headers for `sub` (None: no Authorization header at all)."""
        return dict(extra) if sub is None else self.auth(sub, roles, **extra)

    async def create(self, owner: str, **body: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/sessions", json=body, headers=self.h(owner))
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def full(self, sid: str, sub: str, roles: tuple[str, ...] = ()) -> dict[str, Any]:
        r = await self.client.get(f"/v1/sessions/{sid}?include=full", headers=self.h(sub, roles))
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def add(self, sid: str, sub: str, mad: str) -> dict[str, Any]:
        r = await self.client.post(
            f"/v1/sessions/{sid}/participants", json={"mad_name": mad}, headers=self.h(sub)
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def suspend(self, sid: str, sub: str) -> dict[str, Any]:
        r = await self.client.post(f"/v1/sessions/{sid}/suspend", headers=self.h(sub))
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "dormant", r.text
        return r.json()  # type: ignore[no-any-return]

    async def patch(self, sid: str, sub: str, version: int, **fields: Any) -> dict[str, Any]:
        r = await self.client.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": version, "patch": fields},
            headers=self.h(sub),
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def list_all(self, sub: str, roles: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Every summary `sub` may list, following next_cursor to the end."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(1000):
            params: dict[str, Any] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            r = await self.client.get("/v1/sessions", params=params, headers=self.h(sub, roles))
            assert r.status_code == 200, r.text
            page = r.json()
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return items
        raise AssertionError("next_cursor never ended")


@pytest.fixture
def app_api(api: AsyncTestClient[Any], auth: Callable[..., dict[str, str]]) -> Api:
    return Api(api, auth)


def stable(session: dict[str, Any]) -> dict[str, Any]:
    """A session as a before/after comparison needs it.

    An active participant's `lease_expires_at` is derived from the lease key's remaining TTL at
    read time, so it moves by a millisecond or so between two reads; everything else must not.
    """
    out = dict(session)
    out["participants"] = {
        name: {k: v for k, v in p.items() if not (p.get("active") and k == "lease_expires_at")}
        for name, p in session.get("participants", {}).items()
    }
    return out


def is_hot(r: redis_sync.Redis, sid: str) -> bool:
    return bool(r.exists(hot_key(sid)))

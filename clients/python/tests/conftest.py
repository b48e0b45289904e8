"""A real `sessionmgr serve` (its own process) with a real redis-server, started as the
server's own e2e tests start them (tests/e2e/served.py), and tokens minted the same way.

These tests run from the repository's root in its test venv: they import the server's test
support, never the server from the client.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sessionmgr.api.auth import issue_token  # noqa: E402
from tests.conftest import JWT_SECRET  # noqa: E402
from tests.e2e.served import Served, check_problem, serve  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

LEASE_TTL_S = 2  # short leases, so that lapses and takeovers happen within a test


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    redis = RedisServer().start()
    try:
        env = {
            "SESSIONMGR_REDIS_URL": redis.url,
            "SESSIONMGR_RATE_LIMIT_PER_S": "0",
            "SESSIONMGR_LEASE_TTL_S": str(LEASE_TTL_S),
            "SESSIONMGR_LEASE_GRACE_S": "30",
        }
        with serve(env, tmp_path_factory.mktemp("serve") / "serve.log") as server:
            yield server
    finally:
        redis.cleanup()


def token_for(sub: str) -> str:
    return issue_token(JWT_SECRET, sub)


@dataclass(frozen=True)
class Cast:
    """Unique principals per test: tests share one server."""

    owner: str
    mad: str  # a MAD's name; its principal is mad:<mad>

    @property
    def owner_token(self) -> str:
        return token_for(self.owner)

    @property
    def mad_token(self) -> str:
        return token_for(f"mad:{self.mad}")


@pytest.fixture
def cast() -> Cast:
    tag = secrets.token_hex(4)
    return Cast(owner=f"alice-{tag}", mad=f"planner-{tag}")


async def _one_problem_shape(response: httpx.Response) -> None:
    """Every error answer these tests meet has the server's one problem shape."""
    if response.status_code >= 400 and response.request.method != "HEAD":
        await response.aread()
        check_problem(response)


@pytest.fixture
def http_factory() -> Callable[..., httpx.AsyncClient]:
    """httpx clients whose every error answer is checked against the problem schema."""

    def make(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=15, transport=transport, event_hooks={"response": [_one_problem_shape]}
        )

    return make

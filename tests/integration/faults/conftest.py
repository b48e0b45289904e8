"""Fault-injection fixtures: the app on a Redis of its own that tests kill, freeze and restart.

Short timeouts make each fault show in a fraction of a second: a 0.2 s socket timeout, a
breaker that opens after 4 failures and tries again after 0.5 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest

from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings
from tests.integration.conftest import serving
from tests.support.faults import DurableRedis

BREAKER_FAILURES = 4
BREAKER_RESET_S = 0.5


@pytest.fixture
def durable_redis() -> Iterator[DurableRedis]:
    server = DurableRedis().start()
    yield server
    server.cleanup()


def fault_settings(settings: Settings, redis_url: str) -> Settings:
    return msgspec.structs.replace(
        settings,
        redis_url=redis_url,
        redis_socket_timeout_s=0.2,
        breaker_failures=BREAKER_FAILURES,
        breaker_reset_s=BREAKER_RESET_S,
        retry_timeout_s=1.0,
    )


@pytest.fixture
def fault_container(settings: Settings, durable_redis: DurableRedis) -> Container:
    return build_container(fault_settings(settings, durable_redis.url))


@pytest.fixture
async def fault_api(fault_container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(fault_container) as http:
        yield http

"""Fixtures shared by every test layer: a real redis-server, an S3 endpoint, settings, tokens
and the app."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
import stamina
from litestar.testing import AsyncTestClient

from sessionmgr.api.auth import issue_token
from sessionmgr.app import create_app
from sessionmgr.container import Container, build_container
from sessionmgr.devstack import dev_aws_credentials
from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage import keys
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3_BUCKET, S3Server, start_s3
from tests.support.wire_mongo import LABEL as WIRE_LABEL
from tests.support.wire_mongo import WireMongoServer

JWT_SECRET = "test-secret-that-is-long-enough-0123456789"
# Redis socket timeout of the suites that are not about timeouts (see the `settings` fixture).
REDIS_TIMEOUT_S = 3.0
# Most of the suite reads the outbox, its dead letters and the idle index as one stream and
# one set (`hot.OUTBOX_STREAM`, `DEAD_LETTER_STREAM`, `IDLE_INDEX`: partition 0's), so it runs
# with one partition, and so do the `serve` processes it starts (they inherit this). The
# partitioned layout itself, at the default of 256, is tested on its own:
# tests/integration/test_partitions.py on one Redis, tests/cluster on a Redis Cluster.
TEST_PARTITIONS = 1
os.environ["SESSIONMGR_REDIS_PARTITIONS"] = str(TEST_PARTITIONS)


@pytest.fixture(autouse=True)
def _one_partition() -> None:
    """Every test starts on the suite's layout (a test may configure another for itself)."""
    keys.configure(TEST_PARTITIONS)


@pytest.fixture(autouse=True)
def _stamina_testing() -> Iterator[None]:
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture(autouse=True)
def _nothing_stays_frozen() -> Iterator[None]:
    """An app started with `gc_freeze` on freezes the whole test process's heap: undo it."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session", autouse=True)
def _local_aws_credentials() -> None:
    """Test credentials for every test, and no probe of a cloud metadata endpoint: an S3
    client built by a test without `s3_server` must fail here, not reach out."""
    dev_aws_credentials(os.environ)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port, reached over HTTP by the real aioboto3 client."""
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def wire_mongo() -> Iterator[WireMongoServer]:
    """One MongoDB wire-compatible server (nx-27017, not MongoDB) for the whole run."""
    pytest.importorskip(
        "nx_27017", reason=f"the {WIRE_LABEL} (nx-27017) is not installed: see the tests group"
    )
    server = WireMongoServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None:  # a test stopped it
        redis_server.start()
    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def settings(redis_url: str, s3_server: S3Server) -> Settings:
    return load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri="mongomock://",
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
        redis_partitions=TEST_PARTITIONS,
        outbox_claim_idle_ms=1000,
        rate_limit_per_s=0,  # load tests run as one principal; tests of the limit turn it on
        gc_freeze=False,  # hundreds of apps in one process; test_gc_freeze.py turns it on
        # The test process, with hundreds of apps on its heap, sometimes stalls its event loop
        # for 0.4-1 s (gen-2 collections among the stalls) on a loaded 2-core machine: with the
        # production default of 0.5 s a Redis reply that arrived in time can still count as a
        # timeout. Suites that are not about timeouts get a bound above the stalls; the fault
        # suites (tests/integration/faults) set 0.2 s and test timeouts on purpose.
        redis_socket_timeout_s=REDIS_TIMEOUT_S,
    )


@pytest.fixture
def token() -> Callable[..., str]:
    def make(sub: str = "alice", roles: tuple[str, ...] = ()) -> str:
        return issue_token(JWT_SECRET, sub, roles=roles)

    return make


@pytest.fixture
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(sub: str = "alice", roles: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(sub, roles)}", **extra}

    return headers


@pytest.fixture
def container(settings: Settings) -> Container:
    return build_container(settings)


@pytest.fixture
async def client(container: Container) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(container)) as test_client:
        yield test_client

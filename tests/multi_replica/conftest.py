"""Three `sessionmgr serve` processes sharing one redis-server, one MongoDB (the wire-compatible
server, or the real MongoDB named by SESSIONMGR_TEST_MONGODB_URI) and one S3 endpoint.

The stack starts once for the module; a test that kills or stops a replica leaves it to the
autouse fixture to start it again before the next test.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sessionmgr.api.auth import issue_token
from tests.conftest import JWT_SECRET
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, service_env, start_all
from tests.support.s3_server import S3_BUCKET, S3Server
from tests.support.wire_mongo import LABEL as WIRE
from tests.support.wire_mongo import WireMongoServer

REPLICAS = 3
# Shorter than the defaults so that a dead replica's outbox entries are claimed within a
# second or two, and a paused MongoDB times out in seconds rather than tens of them.
CLAIM_IDLE_MS = 1000
MONGODB_TIMEOUT_MS = 1000


@dataclass
class Stack:
    replicas: list[Replica]
    redis: RedisServer
    mongodb_uri: str
    mongodb_db: str
    wire: WireMongoServer | None  # None when the MongoDB is a real one

    @property
    def label(self) -> str:
        return WIRE if self.wire else "real MongoDB"


REAL_MONGODB = os.environ.get("SESSIONMGR_TEST_MONGODB_URI")


# The parameter only names the MongoDB in the test ids: "[wire-compatible server]" or
# "[real MongoDB]".
@pytest.fixture(scope="module", params=["real MongoDB" if REAL_MONGODB else WIRE])
def stack(s3_server: S3Server) -> Iterator[Stack]:
    real = REAL_MONGODB
    wire: WireMongoServer | None = None
    if not real:
        pytest.importorskip("nx_27017", reason=f"the {WIRE} (nx-27017) is not installed")
        wire = WireMongoServer().start()
    redis = RedisServer().start()
    db = f"replicas{secrets.token_hex(4)}"
    env = service_env(
        redis_url=redis.url,
        mongodb_uri=real or (wire.uri if wire else ""),
        mongodb_db=db,
        mongodb_timeout_ms=str(MONGODB_TIMEOUT_MS),
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
        outbox_claim_idle_ms=str(CLAIM_IDLE_MS),
        rate_limit_per_s="0",
        feed_heartbeat_s="0.5",  # the change feed: a closed stream is noticed quickly
        log_level="WARNING",
    )
    log_dir = Path(tempfile.mkdtemp(prefix="sessionmgr-replicas-"))
    replicas = [Replica(f"replica-{i}", env, log_dir) for i in range(REPLICAS)]
    try:
        start_all(replicas)
        yield Stack(replicas, redis, real or (wire.uri if wire else ""), db, wire)
    finally:
        for replica in replicas:
            replica.stop()
        redis.cleanup()
        if wire is not None:
            wire.cleanup()


@pytest.fixture(autouse=True)
def _all_replicas_up(stack: Stack) -> None:
    if stack.wire is not None:
        stack.wire.resume()
    for replica in stack.replicas:
        if replica.alive():
            replica.resume()
    start_all(stack.replicas)


@pytest.fixture
async def nodes(stack: Stack) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One HTTP client per replica, in replica order."""
    clients = [httpx.AsyncClient(base_url=r.url, timeout=15) for r in stack.replicas]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
def owner() -> str:
    return f"alice-{secrets.token_hex(4)}"


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(JWT_SECRET, sub)}"}

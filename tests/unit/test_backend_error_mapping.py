"""Backend answers that are not plain connection errors still become the right problem.

A body cut short by S3 and a Redis that answers but cannot write (a replica after a Sentinel
failover) are outages: 503 naming the backend, counted by its breaker, never a 500. An S3
object that S3 refuses to serve (moved to Glacier, access denied) is no outage: it fails that
one request and leaves the breaker, and every other session, alone.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError
from fakeredis import FakeAsyncRedis
from redis.exceptions import ReadOnlyError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.metrics import BreakerState, Metrics
from sessionmgr.services.resilience import Breaker, Guarded, RetryPolicy
from sessionmgr.storage.cold import S3ArchiveStore
from sessionmgr.storage.hot import RedisHotStore


class Body:
    def __init__(self, data: bytes | None) -> None:
        self.data = data

    async def __aenter__(self) -> Body:
        return self

    async def __aexit__(self, *exc: object) -> bool:
        return False

    async def read(self) -> bytes:
        if self.data is None:
            raise aiohttp.ClientPayloadError("Response payload is not completed")
        return self.data


class FakeS3:
    """get_object: "cut" answers a truncated body, "glacier" a 403 InvalidObjectState."""

    async def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key == "glacier":
            raise ClientError(
                {
                    "Error": {"Code": "InvalidObjectState", "Message": "archived"},
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "GetObject",
            )
        return {"Body": Body(None if Key == "cut" else b"ok")}


def guarded_s3(fail_max: int) -> tuple[Guarded, Breaker]:
    breaker = Breaker("s3", fail_max=fail_max)
    return Guarded(S3ArchiveStore(FakeS3(), "b"), breaker, RetryPolicy(), Metrics()), breaker


async def test_a_truncated_s3_body_is_an_s3_outage_not_a_500() -> None:
    cold, breaker = guarded_s3(fail_max=1)
    with pytest.raises(BackendUnavailable) as info:
        await cold.get("cut")
    assert info.value.backend == "s3"
    assert breaker.state is BreakerState.OPEN


async def test_an_object_s3_refuses_fails_alone_and_never_opens_the_breaker() -> None:
    cold, breaker = guarded_s3(fail_max=2)
    for _ in range(3):
        with pytest.raises(BackendUnavailable) as info:
            await cold.get("glacier")
        assert info.value.backend == "s3"
        assert "InvalidObjectState" in str(info.value)
    assert breaker.state is BreakerState.CLOSED
    assert await cold.get("healthy") == b"ok"


async def test_a_redis_that_cannot_write_is_a_redis_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = FakeAsyncRedis()

    async def read_only_replica(*args: Any, **kwargs: Any) -> None:
        raise ReadOnlyError("You can't write against a read only replica.")

    monkeypatch.setattr(redis, "eval", read_only_replica)
    breaker = Breaker("redis", fail_max=1)
    hot = Guarded(RedisHotStore(redis), breaker, RetryPolicy(), Metrics())
    with pytest.raises(BackendUnavailable) as info:
        await hot.unfence("s1", "token")  # a write (mark_deleted is a MULTI now)
    assert info.value.backend == "redis"
    assert breaker.state is BreakerState.OPEN

"""The floors of bench/baselines/floor.py do what the report says they do, on real servers.

They are what 10x the peer is held against (bench/report.py): a floor that skipped a round
trip would make the bound look lower than it is.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis as redis_sync
from litestar.testing import AsyncTestClient
from pymongo import MongoClient

from bench import shape
from bench.baselines import floor
from sessionmgr.storage.keys import hot
from tests.support.wire_mongo import WireMongoServer


@pytest.fixture
async def floor_client(
    redis_url: str, wire_mongo: WireMongoServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AsyncTestClient[Any], str]]:
    db = f"floor_{secrets.token_hex(3)}"
    monkeypatch.setenv("BENCH_REDIS_URL", redis_url)
    monkeypatch.setenv("BENCH_MONGODB_URI", wire_mongo.uri)
    monkeypatch.setenv("BENCH_MONGODB_DB", db)
    async with AsyncTestClient(app=floor.app) as client:
        yield client, db


JSON = {"content-type": "application/json"}


@pytest.fixture
def floor_redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    """The Redis the floors write to, read directly."""
    client = redis_sync.Redis.from_url(redis_url)
    yield client
    client.close()


def commands_sent(r: redis_sync.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, less what scripts ran inside."""
    stats = r.info("commandstats")
    inside = {"hincrby", "rpush", "xadd", "info", "config|resetstat"}
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in calls.items() if name not in inside}


async def test_the_append_floor_writes_events_version_and_outbox_in_one_command(
    floor_client: tuple[AsyncTestClient[Any], str], floor_redis: redis_sync.Redis
) -> None:
    """A floor bounds from below only if it does no more than sessionmgr: its append is one
    EVALSHA, as sessionmgr's commit is."""
    client, _db = floor_client
    body = shape.APPEND_BODY.encode()
    floor_redis.config_resetstat()

    first = await client.post("/v1/sessions/abc/timeline", content=body, headers=JSON)
    second = await client.post("/v1/sessions/abc/timeline", content=body, headers=JSON)

    assert first.status_code == second.status_code == 200
    assert [first.json()["version"], second.json()["version"]] == [1, 2]
    assert commands_sent(floor_redis) == {"evalsha": 2}
    timeline = floor_redis.lrange("floor:timeline:abc", 0, -1)
    assert [msgspec.json.decode(e) for e in timeline] == [shape.EVENT, shape.EVENT]
    assert floor_redis.hget("floor:session:abc", "version") == b"2"
    outbox = floor_redis.xrange(floor.OUTBOX)
    assert [fields[b"sid"] for _id, fields in outbox] == [b"abc", b"abc"]
    assert not floor_redis.exists(hot("abc"))  # sessionmgr's keys are left alone


async def test_the_create_floor_writes_nothing_to_redis_when_the_warm_tier_refuses(
    redis_url: str, floor_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MongoDB first, as DESIGN §2 orders a create: no hash without the document."""
    monkeypatch.setenv("BENCH_REDIS_URL", redis_url)
    nobody = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200"  # port 9: discard, unserved
    monkeypatch.setenv("BENCH_MONGODB_URI", nobody)
    async with AsyncTestClient(app=floor.app) as client:
        answer = await client.post("/v1/sessions", content=shape.CREATE_BODY.encode(), headers=JSON)

    assert answer.status_code == 500
    assert floor_redis.keys("floor:*") == []


async def test_the_create_floor_inserts_into_the_warm_tier_then_writes_the_hash(
    floor_client: tuple[AsyncTestClient[Any], str],
    floor_redis: redis_sync.Redis,
    wire_mongo: WireMongoServer,
) -> None:
    client, db = floor_client

    answer = await client.post("/v1/sessions", content=shape.CREATE_BODY.encode(), headers=JSON)

    assert answer.status_code == 201, answer.text
    sid = answer.json()["id"]
    mongo: MongoClient[dict[str, Any]] = MongoClient(wire_mongo.uri)
    try:
        doc = mongo[db]["sessions"].find_one({"_id": sid})
    finally:
        mongo.close()
    assert doc is not None
    assert doc["version"] == 1
    assert doc["work_in_progress"] == shape.WORK_IN_PROGRESS
    assert doc["context_summary"] == shape.CONTEXT_SUMMARY
    assert floor_redis.hget(f"floor:session:{sid}", "version") == b"1"


async def test_a_body_the_floor_cannot_read_is_a_400_and_writes_nothing(
    floor_client: tuple[AsyncTestClient[Any], str], floor_redis: redis_sync.Redis
) -> None:
    client, _db = floor_client

    answer = await client.post("/v1/sessions/abc/timeline", content=b'{"events": 3}', headers=JSON)

    assert answer.status_code == 400
    assert floor_redis.keys("floor:*") == []

"""bench/whatif_batch.py answers each caller with its own reply, on a real redis-server.

Its figures (bench/profiles/findings.md) would mean nothing if a batch handed one caller
another's reply, an error to the wrong caller, or sent what a caller gave up on.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench import whatif_batch

_ECHO = "return ARGV[1]"
_FAIL = "return redis.error_reply('refused ' .. ARGV[1])"
_SET = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.script_flush()
    yield client
    await client.aclose()


async def _call(client: Redis, script: str, keys: list[str], *args: object) -> object:
    return await whatif_batch._batched_evalsha(client, _sha(script), script, keys, *args)


async def test_each_caller_gets_its_own_reply_and_its_own_error(redis: Redis) -> None:
    await redis.script_load(_ECHO)
    await redis.script_load(_FAIL)
    calls = [_call(redis, _FAIL if n % 7 == 3 else _ECHO, ["k"], f"n{n}") for n in range(64)]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    for n, reply in enumerate(replies):
        if n % 7 == 3:
            assert isinstance(reply, ResponseError)
            assert f"refused n{n}" in str(reply)
        else:
            assert reply == f"n{n}".encode()
    assert len(whatif_batch._batches[id(redis)].sending) == 0  # no task left behind


async def test_an_unknown_script_is_sent_whole_for_each_caller(redis: Redis) -> None:
    replies = await asyncio.gather(*(_call(redis, _ECHO, ["k"], f"x{n}") for n in range(5)))
    assert replies == [f"x{n}".encode() for n in range(5)]


async def test_a_caller_that_gave_up_before_the_batch_left_sends_nothing(redis: Redis) -> None:
    await redis.script_load(_SET)
    await redis.delete("gave-up", "kept")
    gave_up = asyncio.ensure_future(_call(redis, _SET, ["gave-up"], "1"))
    kept = asyncio.ensure_future(_call(redis, _SET, ["kept"], "1"))
    await asyncio.sleep(0)  # both queued, the batch not yet sent
    gave_up.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    assert await redis.get("kept") == b"1"
    assert await redis.get("gave-up") is None

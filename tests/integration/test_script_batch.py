"""storage/script_batch.py on a real redis-server: the script calls of one event-loop turn go
as one pipeline, and each caller gets its own reply, its own error, or nothing sent."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sessionmgr.devstack import free_port
from sessionmgr.domain.errors import BackendUnavailable, shared_failure
from sessionmgr.metrics import BreakerState
from sessionmgr.services.resilience import Breaker
from sessionmgr.storage.hot import RedisHotStore, _evalsha, idle_key
from sessionmgr.storage.script_batch import ScriptBatch, batch_of
from tests.unit.factories import SessionRecordFactory

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


@pytest.fixture
def pipelines(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry for each pipeline `redis` makes from now on."""
    made: list[int] = []
    real = redis.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(redis, "pipeline", counted)
    return made


async def _call(client: Redis, script: str, keys: list[str], *args: Any) -> Any:
    return await _evalsha(client, _sha(script), script, keys, *args, batched=True)


async def test_one_turn_s_calls_go_as_one_pipeline_each_with_its_own_reply(
    redis: Redis, pipelines: list[int]
) -> None:
    await redis.script_load(_ECHO)
    await redis.script_load(_FAIL)
    calls = [_call(redis, _FAIL if n % 7 == 3 else _ECHO, ["k"], f"n{n}") for n in range(64)]
    replies = await asyncio.gather(*calls, return_exceptions=True)

    assert len(pipelines) == 1
    for n, reply in enumerate(replies):
        if n % 7 == 3:
            assert isinstance(reply, ResponseError)
            assert f"refused n{n}" in str(reply)
        else:
            assert reply == f"n{n}".encode()
    batch = batch_of(redis)
    assert batch is not None
    assert not batch._sending  # the sending task is gone once it answered


async def test_an_unknown_script_is_sent_whole_for_each_caller(redis: Redis) -> None:
    replies = await asyncio.gather(*(_call(redis, _ECHO, ["k"], f"x{n}") for n in range(5)))
    assert replies == [f"x{n}".encode() for n in range(5)]


async def test_a_caller_that_gave_up_before_the_batch_left_sends_nothing(redis: Redis) -> None:
    await redis.script_load(_SET)
    await redis.delete("gave-up", "kept")
    gave_up = asyncio.ensure_future(_call(redis, _SET, ["gave-up"], "1"))
    kept = asyncio.ensure_future(_call(redis, _SET, ["kept"], "1"))
    await asyncio.sleep(0)  # both waiting for the batch, which has not left
    gave_up.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    assert await redis.get("kept") == b"1"
    assert await redis.get("gave-up") is None


async def test_a_lost_batch_is_each_caller_s_own_error() -> None:
    """Nothing listens: the batch's connection fails, and every caller learns it, each with
    its own copy (its own traceback and chain), caused by the batch's error."""
    client = Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        replies = await asyncio.gather(
            *(_call(client, _ECHO, ["k"], n) for n in range(3)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(reply, RedisConnectionError) for reply in replies)
    assert len({id(reply) for reply in replies}) == 3
    causes = {id(reply.__cause__) for reply in replies}  # type: ignore[union-attr]
    assert len(causes) == 1
    assert isinstance(replies[0].__cause__, RedisConnectionError)  # type: ignore[union-attr]


async def test_pipelines_are_never_batched(redis: Redis) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        assert batch_of(pipe) is None
    assert batch_of(redis) is batch_of(redis)
    assert batch_of(object()) is None


@pytest.mark.parametrize("batch_scripts", [True, False])
async def test_the_store_batches_its_reads_only_when_told(
    redis: Redis, batch_scripts: bool, pipelines: list[int]
) -> None:
    """`SESSIONMGR_REDIS_BATCH=false` (the store's `batch_scripts`) sends each call alone."""
    store = RedisHotStore(redis, batch_scripts=batch_scripts)
    await store.load("0" * 32)  # the layout checked, the script cached
    pipelines.clear()
    views = await asyncio.gather(*(store.load(f"{n:032x}") for n in range(8)))
    assert views == [None] * 8
    assert len(pipelines) == (1 if batch_scripts else 0)


async def test_a_batch_whose_task_ended_unstarted_answers_its_callers(redis: Redis) -> None:
    """The sending task cancelled before its first step (a loop shutting down): its callers
    learn a lost connection (their scripts may or may not have run), never wait forever."""
    batch = ScriptBatch(redis)
    reply = batch.call(("EVALSHA", _sha(_ECHO), 1, "k", "x"))
    batch._send_waiting()  # the turn's batch leaves now (the scheduled one finds it empty)
    (task,) = batch._sending
    task.cancel()
    with pytest.raises(RedisConnectionError, match="ended"):
        await asyncio.wait_for(reply, 2)
    await asyncio.sleep(0)
    assert not batch._sending


async def test_the_creates_of_one_turn_go_as_one_pipeline(
    redis: Redis, pipelines: list[int]
) -> None:
    """A create writes its hash and its idle-index entry with the apply script, which goes
    with the other script calls of its turn, as the MULTI it replaced could not."""
    store = RedisHotStore(redis)
    first = SessionRecordFactory.build()
    await store.create(first, None, b"{}")  # the layout checked, the script cached
    pipelines.clear()
    records = [SessionRecordFactory.build() for _ in range(8)]
    await asyncio.gather(*(store.create(r, None, b"{}") for r in records))
    assert len(pipelines) == 1
    for made in [first, *records]:
        view = await store.load(made.id)
        assert view is not None and view.record == made
        assert await redis.zscore(idle_key(made.id), made.id) is not None


async def test_a_lost_batch_counts_once_toward_the_breaker() -> None:
    """Eight reads in one batch to a Redis that is gone: eight 503s, one failure for the
    breaker (five would open it and put the replica in read-only mode)."""
    client = Redis(port=free_port(), socket_connect_timeout=0.5)
    store, breaker = RedisHotStore(client), Breaker("redis", fail_max=5)
    try:
        reads = [breaker.call(functools.partial(store.load, f"{n:032x}")) for n in range(8)]
        answers = await asyncio.gather(*reads, return_exceptions=True)
    finally:
        await client.aclose()
    assert all(type(a) is BackendUnavailable for a in answers), answers
    assert len({id(shared_failure(a)) for a in answers}) == 1
    assert breaker.state is BreakerState.CLOSED


_SLOW_SET = """redis.call('SET', KEYS[1], ARGV[1])
local i = 0
while i < 3000000 do i = i + 1 end
return 1"""


async def test_a_caller_that_gave_up_while_its_batch_was_out_leaves_the_others_answered(
    redis: Redis,
) -> None:
    """Its script may have run (it did here); the batch still answers everyone else."""
    await redis.script_load(_SLOW_SET)
    await redis.delete("left", "stayed")
    left = asyncio.ensure_future(_call(redis, _SLOW_SET, ["left"], "1"))
    stayed = asyncio.ensure_future(_call(redis, _SLOW_SET, ["stayed"], "1"))
    await asyncio.sleep(0.01)  # the batch left at the end of the turn: Redis runs the scripts
    batch = batch_of(redis)
    assert batch is not None and batch._sending
    left.cancel()
    assert await stayed == 1
    with pytest.raises(asyncio.CancelledError):
        await left
    assert await redis.get("left") == b"1"

"""What the idle sweep needs of Redis: the index of active sessions by age, and its lock.

The index is one sorted set per partition (`session_idle:{p<n>}`, storage/keys.py: session
id → epoch seconds of its last write or load), written by `RedisHotStore` inside the MULTI of
each create, activation and write (it shares the session's slot), and left by a suspend or a
delete in theirs. The sweep checks the session itself before it suspends anything, so an entry
for a session gone meanwhile delays nothing and loses nothing.

The lock (`sessionmgr_idle_sweep_lock`) is a `SET NX PX` with a random token: only its holder
extends or releases it (compare-and-delete), and a crashed holder's lock lapses with its TTL.
"""

from __future__ import annotations

import heapq
import secrets
from datetime import datetime
from typing import Any

import msgspec
from redis.asyncio import Redis

from sessionmgr.storage import keys
from sessionmgr.storage.hot import RedisHotStore, idle_key

SWEEP_LOCK = "sessionmgr_idle_sweep_lock"
_HOT_MATCH = "session_hot:{p*}:*"
_SCAN_COUNT = 500
_guard = RedisHotStore._guard  # the one translation of Redis errors into domain ones

# Forget an entry only if nothing touched it after the cutoff (a fresh write keeps it).
_FORGET_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
_EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdleIndex:
    """`IdleIndex`: active sessions ordered by their last write (or load into Redis)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def _each(self, command: Any) -> list[Any]:
        """`command(pipe, index key)` for every partition: one pipeline (one per node)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in range(keys.partitions()):
                command(pipe, keys.idle_index(partition))
            return list(await _guard(pipe.execute()))

    async def older_than(
        self, cutoff: float, limit: int, offset: int = 0
    ) -> list[tuple[str, float]]:
        """Up to `limit` sessions touched last at or before `cutoff`, oldest first (over every
        partition: each gives its oldest `offset + limit`, merged)."""
        found = await self._each(
            lambda pipe, key: pipe.zrangebyscore(
                key, "-inf", cutoff, start=0, num=offset + limit, withscores=True
            )
        )
        merged = heapq.merge(*found, key=lambda item: item[1])
        ranked = [(sid.decode(), float(score)) for sid, score in merged]
        return ranked[offset : offset + limit]

    async def forget(self, session_id: str, cutoff: float) -> bool:
        """Drop the entry unless the session was touched after `cutoff`."""
        removed = await _guard(
            self._redis.eval(_FORGET_SCRIPT, 1, idle_key(session_id), session_id, cutoff)
        )
        return bool(removed)

    async def postpone(self, session_id: str, at: float) -> None:
        """Score the entry `at` (never lower than it is): the session is looked at again
        `idle after` from then."""
        await _guard(self._redis.zadd(idle_key(session_id), {session_id: at}, gt=True))

    async def size(self) -> int:
        return sum(int(n) for n in await self._each(lambda pipe, key: pipe.zcard(key)))

    async def backfill(self) -> int:
        """Index every hot session the index lacks (those hot before it existed), scored by
        its `last_active`: one SCAN of the keyspace (of every node of a Cluster), for an
        operator to run once after an upgrade (`sessionmgr idle-sweep --backfill`), never by
        the sweep. Returns how many it added; an entry the index has is left as it is."""
        added = 0
        async for key in self._redis.scan_iter(match=_HOT_MATCH, count=_SCAN_COUNT):
            raw = await _guard(self._redis.hget(key, "last_active"))
            if raw is None:
                continue  # suspended meanwhile
            last_active = msgspec.json.decode(raw, type=datetime)
            session_id = keys.session_id_in(key)
            fresh = {session_id: last_active.timestamp()}
            added += int(await _guard(self._redis.zadd(idle_key(session_id), fresh, nx=True)))
        return added


class RedisSweepLock:
    """`SweepLock`: one idle sweep at a time across every replica and CLI run."""

    def __init__(self, redis: Redis, key: str = SWEEP_LOCK) -> None:
        self._redis = redis
        self._key = key

    async def acquire(self, ttl_ms: int) -> str | None:
        token = secrets.token_hex(16)
        taken = await _guard(self._redis.set(self._key, token, nx=True, px=ttl_ms))
        return token if taken else None

    async def extend(self, token: str, ttl_ms: int) -> bool:
        return bool(await _guard(self._redis.eval(_EXTEND_SCRIPT, 1, self._key, token, ttl_ms)))

    async def release(self, token: str) -> None:
        await _guard(self._redis.eval(_RELEASE_SCRIPT, 1, self._key, token))

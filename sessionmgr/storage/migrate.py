"""Move a Redis written by sessionmgr < 0.2 (one outbox stream, `{<session id>}` hash tags) to
the partitioned layout of storage/keys.py: `sessionmgr redis migrate-layout`.

Run it with every replica stopped (a replica of the old version would go on writing the old
keys; one of this version refuses to start while they exist). It is safe to run again after
a failure: a key already moved no longer matches the old names, an outbox entry copied twice
reaches MongoDB twice, which its version guard and write ids make harmless.

- every per-session key is RENAMEd to its new name (its TTL goes with it); the index of a
  session's idempotency records is rewritten to the records' new names;
- the outbox's and the dead-letter stream's entries are copied into their partitions'
  streams, then the old streams are deleted; so is the old idle index, copied first;
- the layout is recorded (`keys.LAYOUT_KEY`).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from sessionmgr.storage import keys

_OLD_KEY = re.compile(r"^(session_[a-z_]+):\{([^}]*)\}(?::(.*))?$")
_BATCH = 500


class Migrated(msgspec.Struct):
    keys: int = 0
    outbox_entries: int = 0
    dead_letters: int = 0
    idle_entries: int = 0


def new_name(old: str) -> str | None:
    """The partitioned name of a key of the old layout (None: not a key it moves)."""
    match = _OLD_KEY.match(old)
    if match is None:
        return None
    prefix, tag, rest = match.groups()
    if tag.startswith("p") and tag[1:].isdigit():
        return None  # already partitioned
    if prefix == "session_idem" and tag == "create" and rest:
        return keys.create_idem(rest)
    if prefix == "session_idem" and rest:
        return keys.idem(tag, rest)
    if prefix == "session_lease" and rest is not None:
        return keys.lease(tag, rest)
    simple = {
        "session_hot": keys.hot,
        "session_timeline": keys.timeline,
        "session_feed": keys.feed,
        "session_archiving": keys.fence,
        "session_gone": keys.gone,
        "session_rebased": keys.rebased,
        "session_idem_keys": keys.idem_index,
    }
    make = simple.get(prefix)
    return make(tag) if make is not None and rest is None else None


async def migrate_layout(redis: Any) -> Migrated:
    if hasattr(redis, "nodes_manager"):
        raise ValueError("a Redis Cluster never held the old layout: there is nothing to move")
    found = await redis.get(keys.LAYOUT_KEY)
    if found is not None and found.decode() != keys.expected_layout():
        raise keys.LayoutMismatch(
            f"Redis holds the layout {found.decode()!r}, not {keys.expected_layout()!r}: "
            "set SESSIONMGR_REDIS_PARTITIONS back before moving anything"
        )
    done = Migrated()
    async for raw in redis.scan_iter(match=keys.LEGACY_KEY_MATCH, count=_BATCH):
        old = raw.decode()
        new = new_name(old)
        if new is None:
            continue
        if old.startswith("session_idem_keys:"):
            await _rewrite_index(redis, old)
        await redis.rename(old, new)
        done.keys += 1
    done.outbox_entries = await _move_stream(redis, keys.LEGACY_OUTBOX, keys.outbox)
    done.dead_letters = await _move_stream(redis, keys.LEGACY_DEAD_LETTERS, keys.dead_letters)
    done.idle_entries = await _move_idle(redis)
    await redis.set(keys.LAYOUT_KEY, keys.expected_layout())
    return done


async def _rewrite_index(redis: Any, index: str) -> None:
    """The index names the records it holds: give it their new names."""
    members = await redis.zrange(index, 0, -1, withscores=True)
    renamed = {new_name(m.decode()) or m.decode(): score for m, score in members}
    async with redis.pipeline(transaction=True) as pipe:
        ttl = await redis.ttl(index)
        pipe.delete(index)
        if renamed:
            pipe.zadd(index, renamed)
            if ttl > 0:
                pipe.expire(index, ttl)
        await pipe.execute()


async def _move_stream(redis: Any, old: str, stream_of: Any) -> int:
    moved, start = 0, "-"
    while True:
        batch = await redis.xrange(old, min=start, max="+", count=_BATCH)
        async with redis.pipeline(transaction=False) as pipe:
            for _, fields in batch:
                sid = fields.get(b"sid", b"").decode()
                pipe.xadd(stream_of(keys.partition_of(sid)), fields)
            await pipe.execute()
        moved += len(batch)
        if len(batch) < _BATCH:
            break
        start = "(" + batch[-1][0].decode()
    await redis.delete(old)
    return moved


async def _move_idle(redis: Any) -> int:
    if await redis.type(keys.LEGACY_IDLE_INDEX) != b"zset":
        return 0
    entries = await redis.zrange(keys.LEGACY_IDLE_INDEX, 0, -1, withscores=True)
    async with redis.pipeline(transaction=False) as pipe:
        for sid, score in entries:
            pipe.zadd(keys.idle_index(keys.partition_of(sid.decode())), {sid: score})
        pipe.delete(keys.LEGACY_IDLE_INDEX)
        await pipe.execute()
    return len(entries)

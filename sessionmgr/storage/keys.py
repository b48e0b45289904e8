"""The Redis key layout: every key of a session carries the hash tag of its partition.

A session belongs to one of `partitions` partitions (CRC-32 of its id, modulo the count).
Its hash, timeline, leases, change feed, idempotency records and tombstone, the partition's
outbox stream, dead-letter stream and idle index all carry the tag `{p<n>}`, so each lands in
one Redis Cluster slot and every MULTI of a write stays in that slot. Standalone Redis and
Sentinel use the same layout: one code path.

The count is fixed for the life of a deployment (`SESSIONMGR_REDIS_PARTITIONS`, default 256):
a replica with another count would look for a session's keys under another tag. Redis keeps
the count it was first used with (`LAYOUT_KEY`); a replica configured otherwise refuses to
start (`check_layout`).
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Any

DEFAULT_PARTITIONS = 256
LAYOUT_KEY = "sessionmgr_layout"
LAYOUT_VERSION = "2"
_partitions = DEFAULT_PARTITIONS


class LayoutMismatch(RuntimeError):
    """Redis holds data written with another layout or partition count."""


def configure(partitions: int) -> None:
    """Set the partition count of this process (once, at start-up, from the settings)."""
    global _partitions
    if not 1 <= partitions <= 16_384:
        raise ValueError("partitions must be between 1 and 16384")
    _partitions = partitions
    _tag_of.cache_clear()


def partitions() -> int:
    return _partitions


def partition_of(session_id: str) -> int:
    return zlib.crc32(session_id.encode()) % _partitions


def tag(partition: int) -> str:
    return f"{{p{partition}}}"


@functools.lru_cache(maxsize=16_384)
def _tag_of(session_id: str) -> str:
    """The tag of a session's keys, kept (for the count `configure` set): a write names up
    to nine of them, and each a CRC-32 and two strings otherwise. At most about 3.5 MB (the
    ids and their tags); a session out of it costs what every one did before."""
    return tag(partition_of(session_id))


def _of(prefix: str, session_id: str) -> str:
    return f"{prefix}:{_tag_of(session_id)}:{session_id}"


def session_id_in(key: str | bytes) -> str:
    """The session id a per-session key names (whatever its prefix)."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[text.index("}:") + 2 :].split(":", 1)[0]


def hot(session_id: str) -> str:
    return _of("session_hot", session_id)


def timeline(session_id: str) -> str:
    return _of("session_timeline", session_id)


def lease(session_id: str, mad: str) -> str:
    return f"{_of('session_lease', session_id)}:{mad}"


def feed(session_id: str) -> str:
    return _of("session_feed", session_id)


def fence(session_id: str) -> str:
    return _of("session_archiving", session_id)


def gone(session_id: str) -> str:
    return _of("session_gone", session_id)


def rebased(session_id: str) -> str:
    return _of("session_rebased", session_id)


def idem_index(session_id: str) -> str:
    return _of("session_idem_keys", session_id)


def idem(session_id: str, key_digest: str) -> str:
    """The idempotency record of a request on the session: in the session's slot, written
    in the MULTI of the write it answers."""
    return f"{_of('session_idem', session_id)}:{key_digest}"


def create_idem(key_digest: str) -> str:
    """A create's idempotency record: its session does not exist yet, so the key's own slot."""
    return f"session_idem_create:{{{key_digest}}}"


def outbox(partition: int) -> str:
    return f"session_outbox:{tag(partition)}"


def dead_letters(partition: int) -> str:
    return f"session_outbox_dead:{tag(partition)}"


def idle_index(partition: int) -> str:
    return f"session_idle:{tag(partition)}"


def partition_of_key(key: str | bytes) -> int:
    """The partition a tagged key belongs to."""
    text = key.decode() if isinstance(key, bytes) else key
    return int(text[text.index("{p") + 2 : text.index("}")])


def caller_keys(caller: str) -> str:
    """A caller's live idempotency keys: its own slot, outside every session's MULTI."""
    return f"session_idem_caller:{{{caller}}}"


# Keys of the layout before partitions (one outbox stream, `{<session id>}` tags).
LEGACY_OUTBOX = "session_outbox"
LEGACY_DEAD_LETTERS = "session_outbox_dead"
LEGACY_IDLE_INDEX = "session_idle"
# Any per-session key of the old layout: its tag is a session id (hex) or `create`, never
# `p<n>` (session ids are hex: they never start with "p").
LEGACY_KEY_MATCH = "session_*:{[^p]*}*"


def expected_layout() -> str:
    return f"v{LAYOUT_VERSION} partitions={_partitions}"


async def check_layout(redis: Any) -> None:
    """Record this layout in an empty Redis, or check the one Redis holds.

    Raises `LayoutMismatch` when Redis holds another partition count, or data of the layout
    before partitions (`sessionmgr redis migrate-layout` moves it).
    """
    wanted = expected_layout().encode()
    found = await redis.get(LAYOUT_KEY)
    if found == wanted:
        return
    if found is not None:
        raise LayoutMismatch(
            f"Redis holds sessions laid out as {found.decode()!r}, this replica is configured "
            f"for {wanted.decode()!r}: SESSIONMGR_REDIS_PARTITIONS is fixed for the life of a "
            "deployment; set it back"
        )
    if await has_legacy_data(redis):
        raise LayoutMismatch(
            "Redis holds sessions of the key layout before partitions (sessionmgr < 0.2): stop "
            "every replica, run `sessionmgr redis migrate-layout`, then start this version"
        )
    await redis.set(LAYOUT_KEY, wanted, nx=True)
    if (await redis.get(LAYOUT_KEY)) != wanted:  # another replica set another one meanwhile
        await check_layout(redis)


async def has_legacy_data(redis: Any) -> bool:
    if await redis.exists(LEGACY_OUTBOX, LEGACY_DEAD_LETTERS, LEGACY_IDLE_INDEX):
        return True
    async for key in redis.scan_iter(match=LEGACY_KEY_MATCH, count=1000):
        if is_legacy(key):
            return True
    return False


_LEGACY = re.compile(
    r"^session_(hot|timeline|lease|feed|archiving|gone|rebased|idem_keys|idem):\{(?!p\d+\})"
)


def is_legacy(key: str | bytes) -> bool:
    """A per-session key of the old layout (not a caller's key, which did not change)."""
    return bool(_LEGACY.match(key.decode() if isinstance(key, bytes) else key))

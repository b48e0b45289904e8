"""The Redis outbox: the write-behind's side of it (`RedisOutbox`, the `Outbox` port) and an
operator's (`OutboxAdmin`: what is pending, who consumes it, what was parked).

`OutboxAdmin` backs `sessionmgr outbox status | replay | drop`. A replay puts a parked entry
back into the outbox as it was: MongoDB's version guard (and the write ids) make a second
delivery of the same write harmless, so replaying everything is always safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.services.ports import Delivery, OutboxConsumer, OutboxEntry
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM

log = logging.getLogger(__name__)
GROUP = "writebehind"  # the write-behind's consumer group (services/write_behind.py)
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


class DeadLetter(msgspec.Struct, frozen=True):
    id: str
    outbox_id: str
    session_id: str | None
    version: int | None
    error: str
    attempts: int | None
    parked_at: int | None


class Consumer(msgspec.Struct, frozen=True):
    name: str
    pending: int
    idle_ms: int


class OutboxStatus(msgspec.Struct, frozen=True):
    pending: int
    oldest_age_s: float
    consumers: list[Consumer]
    dead_letters: int
    dead: list[DeadLetter]


def _text(raw: Any) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _int(raw: Any) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    session_id: str | None = None
    version: int | None = None
    try:
        entry = _decode_entry(fields[b"entry"])
        session_id, version = entry.record.id, entry.record.version
    except (KeyError, msgspec.DecodeError):
        session_id = _text(fields[b"sid"]) if b"sid" in fields else None
    return DeadLetter(
        id=_text(entry_id),
        outbox_id=_text(fields.get(b"id", b"")),
        session_id=session_id,
        version=version,
        error=_text(fields.get(b"error", b"")),
        attempts=_int(fields.get(b"attempts")),
        parked_at=_int(fields.get(b"parked_at")),
    )


class OutboxAdmin:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def status(self, limit: int = 100) -> OutboxStatus:
        pending = int(await self._redis.xlen(OUTBOX_STREAM))
        oldest: Any = await self._redis.xrange(OUTBOX_STREAM, count=1) if pending else []
        age = time.time() - int(oldest[0][0].split(b"-")[0]) / 1000 if oldest else 0.0
        consumers = [
            Consumer(name=_text(c["name"]), pending=int(c["pending"]), idle_ms=int(c["idle"]))
            for c in await self._consumers()
        ]
        dead: Any = await self._redis.xrange(DEAD_LETTER_STREAM, count=limit)
        return OutboxStatus(
            pending=pending,
            oldest_age_s=max(0.0, age),
            consumers=consumers,
            dead_letters=int(await self._redis.xlen(DEAD_LETTER_STREAM)),
            dead=[dead_letter(i, f) for i, f in dead],
        )

    async def _consumers(self) -> list[dict[str, Any]]:
        try:
            return list(await self._redis.xinfo_consumers(OUTBOX_STREAM, GROUP))
        except ResponseError as exc:  # no stream or no group yet: nobody consumes
            if "no such key" in str(exc).lower() or "nogroup" in str(exc).lower():
                return []
            raise

    async def replay(self, ids: list[str] | None = None) -> list[DeadLetter]:
        """Put parked entries (these ids, or all) back into the outbox; returns them."""
        if ids is None:
            found: Any = await self._redis.xrange(DEAD_LETTER_STREAM)
        else:
            found = []
            for i in ids:
                found += await self._redis.xrange(DEAD_LETTER_STREAM, i, i)
        replayed = []
        for entry_id, fields in found:
            letter = dead_letter(entry_id, fields)
            original = {k: v for k, v in fields.items() if k in (b"sid", b"entry")}
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(OUTBOX_STREAM, original)
                pipe.xdel(DEAD_LETTER_STREAM, entry_id)
                await pipe.execute()
            log.warning(
                "outbox dead letter %s (session %s v%s) replayed into the outbox",
                letter.id,
                letter.session_id,
                letter.version,
                extra={"session_id": letter.session_id},
            )
            replayed.append(letter)
        return replayed

    async def drop(self, entry_id: str) -> DeadLetter | None:
        """Delete one parked entry for good; its write never reaches MongoDB."""
        found: Any = await self._redis.xrange(DEAD_LETTER_STREAM, entry_id, entry_id)
        if not found:
            return None
        letter = dead_letter(*found[0])
        await self._redis.xdel(DEAD_LETTER_STREAM, entry_id)
        log.warning(
            "outbox dead letter %s (session %s v%s) dropped by an operator; last error: %s",
            letter.id,
            letter.session_id,
            letter.version,
            letter.error,
            extra={"session_id": letter.session_id},
        )
        return letter


# -- the write-behind's side: the `Outbox` port on a Redis Stream and its consumer group ---------

T = TypeVar("T")


async def _redis(awaitable: Awaitable[T]) -> T:
    """Any Redis failure (unreachable, or an answer such as NOGROUP after Redis restarted
    empty) is the store being unavailable: the worker backs off and sets its group up again."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:
        raise BackendUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc


def delivery(entry_id: bytes, fields: dict[bytes, bytes] | None) -> Delivery:
    raw = fields or {}
    if not raw:  # deleted from the stream, still on a pending list
        return Delivery(id=entry_id, raw=raw)
    try:
        return Delivery(id=entry_id, raw=raw, entry=_decode_entry(raw[b"entry"]))
    except (KeyError, msgspec.DecodeError) as exc:
        return Delivery(id=entry_id, raw=raw, problem=f"undecodable entry: {exc}")


class RedisOutbox:
    """`Outbox`: the `session_outbox` stream, consumed by the group `GROUP`. An entry is
    deleted from the stream when it is acknowledged, so the stream holds exactly what MongoDB
    does not have yet; parked entries go to `session_outbox_dead`, never trimmed."""

    dead_letter_name = DEAD_LETTER_STREAM

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(OUTBOX_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BackendUnavailable("redis", str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc

    async def read(
        self, consumer: str, after: str | bytes, count: int, block_ms: int | None = None
    ) -> list[Delivery]:
        """New entries (`after` is `>`), or this consumer's pending ones after an id."""
        reply: Any = await _redis(
            self._redis.xreadgroup(
                GROUP, consumer, {OUTBOX_STREAM: after}, count=count, block=block_ms
            )
        )
        return [delivery(i, f) for i, f in (reply[0][1] if reply else [])]

    async def claim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[Delivery]]:
        """XAUTOCLAIM: entries pending on any consumer for `min_idle_ms`; the next start
        (`0-0` once the whole pending list was seen)."""
        reply: Any = await _redis(
            self._redis.xautoclaim(OUTBOX_STREAM, GROUP, consumer, min_idle_ms, start, count=count)
        )
        following = _text(reply[0])
        return following, [delivery(i, f) for i, f in reply[1]]

    async def consumers(self) -> list[OutboxConsumer]:
        found: Any = await _redis(self._redis.xinfo_consumers(OUTBOX_STREAM, GROUP))
        return [
            OutboxConsumer(name=_text(c["name"]), pending=int(c["pending"]), idle_ms=int(c["idle"]))
            for c in found
        ]

    async def remove_consumer(self, name: str) -> None:
        await _redis(self._redis.xgroup_delconsumer(OUTBOX_STREAM, GROUP, name))

    async def ack(self, entry_id: bytes) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(OUTBOX_STREAM, GROUP, entry_id)
            pipe.xdel(OUTBOX_STREAM, entry_id)
            await _redis(pipe.execute())

    async def park(self, delivery: Delivery, error: str, attempts: int) -> int:
        """Move the entry to the dead-letter stream with its last error, in one MULTI;
        returns how many entries that stream holds now."""
        async with self._redis.pipeline(transaction=True) as pipe:
            dead: dict[Any, Any] = {
                **delivery.raw,
                b"error": error.encode(),
                b"id": delivery.id,
                b"attempts": str(attempts).encode(),
                b"parked_at": str(int(time.time())).encode(),
            }
            pipe.xadd(DEAD_LETTER_STREAM, dead)
            pipe.xack(OUTBOX_STREAM, GROUP, delivery.id)
            pipe.xdel(OUTBOX_STREAM, delivery.id)
            pipe.xlen(DEAD_LETTER_STREAM)
            *_, dead_letters = await _redis(pipe.execute())
        return int(dead_letters)

    async def dead_letters(self) -> int:
        return int(await _redis(self._redis.xlen(DEAD_LETTER_STREAM)))

    async def pending(self) -> int:
        return int(await _redis(self._redis.xlen(OUTBOX_STREAM)))

    async def oldest_age_s(self) -> float:
        """How long the oldest entry not yet in MongoDB has waited (0 with none)."""
        oldest: Any = await _redis(self._redis.xrange(OUTBOX_STREAM, count=1))
        # A stream id starts with its entry's creation time in milliseconds.
        lag_s = time.time() - int(oldest[0][0].split(b"-")[0]) / 1000 if oldest else 0.0
        return max(0.0, lag_s)

"""The outbox as an operator sees it: what is pending, who consumes it, what was parked.

Backs `sessionmgr outbox status | replay | drop`. A replay puts a parked entry back into the
outbox as it was: MongoDB's version guard (and the write ids) make a second delivery of the
same write harmless, so replaying everything is always safe.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM, OutboxEntry

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

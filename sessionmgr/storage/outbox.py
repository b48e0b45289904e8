"""The Redis outbox: the write-behind's side of it (`RedisOutbox`, the `Outbox` port) and an
operator's (`OutboxAdmin`: what is pending, who consumes it, what was parked).

`OutboxAdmin` backs `sessionmgr outbox status | replay | drop`. A replay puts a parked entry
back into the outbox as it was: MongoDB's version guard (and the write ids) make a second
delivery of the same write harmless, so replaying everything is always safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.services.ports import Delivery, OutboxConsumer, OutboxEntry
from sessionmgr.storage import keys
from sessionmgr.storage.redis_nodes import nodes_of

log = logging.getLogger(__name__)
GROUP = "writebehind"  # the write-behind's consumer group (services/write_behind.py)
PER_PARTITION_MIN = 4  # entries a read takes from each partition at least
BUSY_BATCHES = 4  # a read takes up to this many batches from the partitions with a backlog
ACKS_AT_ONCE = 8  # on a Cluster, partitions acknowledged side by side (one MULTI each)
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
    """What an operator sees and does: over every partition's outbox and dead-letter stream.
    A dead letter's id is `<partition>/<id in that partition's dead-letter stream>`."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._outbox = RedisOutbox(redis)

    async def status(self, limit: int = 100) -> OutboxStatus:
        pending = await self._outbox.pending()
        consumers = await self._outbox.consumers()
        dead = await self._dead(limit)
        return OutboxStatus(
            pending=pending,
            oldest_age_s=await self._outbox.oldest_age_s() if pending else 0.0,
            consumers=[
                Consumer(name=c.name, pending=c.pending, idle_ms=c.idle_ms) for c in consumers
            ],
            dead_letters=await self._outbox.dead_letters(),
            dead=[dead_letter(i, f) for i, f in dead],
        )

    async def _dead(self, limit: int | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Parked entries, oldest first over every partition, ids with their partition."""
        replies = await self._outbox._each(
            lambda pipe, p: pipe.xrange(keys.dead_letters(p), count=limit)
        )
        found = [
            (_id(p, i), f)
            for p, reply in enumerate(replies)
            if not isinstance(reply, Exception)
            for i, f in reply
        ]
        found.sort(key=lambda item: _stream_order(item[0]))
        return found if limit is None else found[:limit]

    async def _one(self, letter_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            partition, entry_id = _split(letter_id)
        except ValueError:
            return []
        if not 0 <= partition < keys.partitions():
            return []
        found: Any = await self._redis.xrange(keys.dead_letters(partition), entry_id, entry_id)
        return [(_id(partition, i), f) for i, f in found]

    async def replay(self, ids: list[str] | None = None) -> list[DeadLetter]:
        """Put parked entries (these ids, or all) back into the outbox; returns them."""
        if ids is None:
            found = await self._dead()
        else:
            found = []
            for i in ids:
                found += await self._one(i)
        replayed = []
        for letter_id, fields in found:
            letter = dead_letter(letter_id, fields)
            partition, entry_id = _split(letter_id)
            original: dict[Any, Any] = {k: v for k, v in fields.items() if k in (b"sid", b"entry")}
            async with (await self._outbox._at(keys.outbox(partition))).pipeline(
                transaction=True
            ) as pipe:
                pipe.xadd(keys.outbox(partition), original)
                pipe.xdel(keys.dead_letters(partition), entry_id)
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
        found = await self._one(entry_id)
        if not found:
            return None
        letter = dead_letter(*found[0])
        partition, stream_id = _split(found[0][0])
        await self._redis.xdel(keys.dead_letters(partition), stream_id)
        log.warning(
            "outbox dead letter %s (session %s v%s) dropped by an operator; last error: %s",
            letter.id,
            letter.session_id,
            letter.version,
            letter.error,
            extra={"session_id": letter.session_id},
        )
        return letter


def _stream_order(delivery_id: bytes) -> tuple[int, int]:
    ms, _, seq = _split(delivery_id)[1].partition("-")
    return int(ms), int(seq or 0)


# -- the write-behind's side: the `Outbox` port on a Redis Stream and its consumer group ---------

T = TypeVar("T")


async def _redis(awaitable: Awaitable[T]) -> T:
    """Any Redis failure (unreachable, or an answer such as NOGROUP after Redis restarted
    empty) is the store being unavailable: the worker backs off and sets its group up again."""
    try:
        return await awaitable
    except (RedisError, RedisClusterException, OSError) as exc:
        raise BackendUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc


def delivery(entry_id: bytes, fields: dict[bytes, bytes] | None) -> Delivery:
    raw = fields or {}
    if not raw:  # deleted from the stream, still on a pending list
        return Delivery(id=entry_id, raw=raw)
    try:
        return Delivery(id=entry_id, raw=raw, entry=_decode_entry(raw[b"entry"]))
    except (KeyError, msgspec.DecodeError) as exc:
        return Delivery(id=entry_id, raw=raw, problem=f"undecodable entry: {exc}")


def _is_cluster(redis: Any) -> bool:
    return hasattr(redis, "nodes_manager")


def _id(partition: int, entry_id: bytes | str) -> bytes:
    """A delivery's id: its partition and its id in that partition's stream."""
    raw = entry_id.encode() if isinstance(entry_id, str) else entry_id
    return b"%d/%s" % (partition, raw)


def _split(delivery_id: str | bytes) -> tuple[int, str]:
    text = delivery_id.decode() if isinstance(delivery_id, bytes) else delivery_id
    partition, _, entry_id = text.partition("/")
    return int(partition), entry_id


class RedisOutbox:
    """`Outbox`: one stream per partition (`session_outbox:{p<n>}`, storage/keys.py), each
    consumed by the group `GROUP`. An entry is deleted from its stream when it is
    acknowledged, so the streams hold exactly what MongoDB does not have yet; parked entries
    go to the partition's `session_outbox_dead:{p<n>}`, never trimmed.

    A delivery's id names its partition (`<n>/<stream id>`). On one Redis (standalone or
    Sentinel) new entries of every partition come from one blocking XREADGROUP; a Cluster
    refuses a read across slots, so there each partition is read without blocking, one
    pipeline per node, and an empty round waits `poll_ms` before the next.
    """

    dead_letter_name = "session_outbox_dead:{p*}"

    def __init__(self, redis: Redis, *, poll_ms: int = 50) -> None:
        self._redis = redis
        self._at = nodes_of(redis).of  # a partition's transactions run on its node
        self._cluster = _is_cluster(redis)
        self._poll_ms = poll_ms
        self._busy: set[int] = set()  # partitions whose last read left more behind

    @staticmethod
    def _partitions(first: int = 0) -> range:
        return range(first, keys.partitions())

    @staticmethod
    def _per_partition(count: int) -> int:
        """COUNT for each partition's read, so that one call takes about `count` entries, not
        `count` from every partition (256 x the batch): at least a few each, so that a
        backlog in one partition still drains in batches."""
        return max(PER_PARTITION_MIN, -(-count // keys.partitions()))

    async def _each(self, command: Any, first: int = 0) -> list[Any]:
        """Run `command(pipe, partition)` for every partition in one pipeline (one per node
        on a Cluster); each reply or the error that partition met, in partition order."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._partitions(first):
                command(pipe, partition)
            return list(await _redis(pipe.execute(raise_on_error=False)))

    async def ensure_group(self) -> None:
        replies = await self._each(
            lambda pipe, p: pipe.xgroup_create(keys.outbox(p), GROUP, id="0", mkstream=True)
        )
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise BackendUnavailable("redis", f"{type(reply).__name__}: {reply}")

    async def read(
        self, consumer: str, after: str | bytes, count: int, block_ms: int | None = None
    ) -> list[Delivery]:
        """New entries (`after` is `>`), or this consumer's pending ones after a delivery id
        (`0`: all of them), in partition order."""
        if after == ">":
            return await self._read_new(consumer, count, block_ms)
        first, start = (0, "0") if after in ("0", b"0") else _split(after)
        replies = await self._each(
            lambda pipe, p: pipe.xreadgroup(
                GROUP, consumer, {keys.outbox(p): start if p == first else "0"}, count=count
            ),
            first,
        )
        found = self._deliveries(replies, first)
        return found[:count]

    def _deliveries(self, replies: list[Any], first: int = 0) -> list[Delivery]:
        found: list[Delivery] = []
        for partition, reply in enumerate(replies, start=first):
            if isinstance(reply, Exception):
                raise BackendUnavailable("redis", f"{type(reply).__name__}: {reply}")
            for _stream, entries in reply or []:
                found += [delivery(_id(partition, i), f) for i, f in entries]
        return found

    async def _read_new(self, consumer: str, count: int, block_ms: int | None) -> list[Delivery]:
        """New entries, about `count` of them: a few from every partition, and more from the
        partitions that had more than that last time (`_busy`), so that one busy session
        drains in batches and a backlog everywhere (after an outage) does not put 256 batches
        on this consumer at once. Every partition is read every round: none starves."""
        found: list[Delivery] = []
        if self._busy:
            busy = sorted(self._busy)
            share = max(self._per_partition(count), count * BUSY_BATCHES // len(busy))
            async with self._redis.pipeline(transaction=False) as pipe:
                for p in busy:
                    pipe.xreadgroup(GROUP, consumer, {keys.outbox(p): ">"}, count=share)
                replies = list(await _redis(pipe.execute(raise_on_error=False)))
            self._busy = set()
            for partition, answer in zip(busy, replies, strict=True):
                found += self._taken(partition, self._deliveries([answer], partition), share)
        each = self._per_partition(count)
        wait = None if found else block_ms
        if not self._cluster:
            streams = {keys.outbox(p): ">" for p in self._partitions()}
            reply: Any = await _redis(
                self._redis.xreadgroup(GROUP, consumer, streams, count=each, block=wait)  # type: ignore[arg-type]
            )
            for stream, entries in reply or []:
                partition = keys.partition_of_key(stream)
                taken = [delivery(_id(partition, i), f) for i, f in entries]
                found += self._taken(partition, taken, each)
            return found
        replies = await self._each(
            lambda pipe, p: pipe.xreadgroup(GROUP, consumer, {keys.outbox(p): ">"}, count=each)
        )
        for partition, answer in enumerate(replies):
            found += self._taken(partition, self._deliveries([answer], partition), each)
        if not found and wait:
            await asyncio.sleep(min(wait, self._poll_ms) / 1000)
        return found

    def _taken(self, partition: int, taken: list[Delivery], asked: int) -> list[Delivery]:
        """Note a partition that gave all it was asked for (it may hold more: `_busy`)."""
        if len(taken) >= asked:
            self._busy.add(partition)
        return taken

    async def claim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[Delivery]]:
        """XAUTOCLAIM in every partition from `start` (`0-0`, or the cursor this returned):
        entries pending on any consumer for `min_idle_ms`; the next cursor (`0-0` once every
        partition's whole pending list was seen)."""
        first, begin = (0, "0-0") if start == "0-0" else _split(start)
        each = self._per_partition(count)
        replies = await self._each(
            lambda pipe, p: pipe.xautoclaim(
                keys.outbox(p),
                GROUP,
                consumer,
                min_idle_ms,
                begin if p == first else "0-0",
                count=each,
            ),
            first,
        )
        found: list[Delivery] = []
        following = "0-0"
        for partition, reply in enumerate(replies, start=first):
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply):
                    continue  # a partition never written to since Redis started empty
                raise BackendUnavailable("redis", f"{type(reply).__name__}: {reply}")
            found += [delivery(_id(partition, i), f) for i, f in reply[1]]
            if following == "0-0" and _text(reply[0]) != "0-0":
                following = f"{partition}/{_text(reply[0])}"
        return following, found

    async def consumers(self) -> list[OutboxConsumer]:
        """The group's consumers over every partition: entries pending on each, and the
        least time any partition saw it idle."""
        replies = await self._each(lambda pipe, p: pipe.xinfo_consumers(keys.outbox(p), GROUP))
        pending: dict[str, int] = {}
        idle: dict[str, int] = {}
        for reply in replies:
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply) or "no such key" in str(reply).lower():
                    continue
                raise BackendUnavailable("redis", f"{type(reply).__name__}: {reply}")
            for c in reply:
                name = _text(c["name"])
                pending[name] = pending.get(name, 0) + int(c["pending"])
                idle[name] = min(idle.get(name, int(c["idle"])), int(c["idle"]))
        return [OutboxConsumer(name=n, pending=pending[n], idle_ms=idle[n]) for n in pending]

    async def remove_consumer(self, name: str) -> None:
        await self._each(lambda pipe, p: pipe.xgroup_delconsumer(keys.outbox(p), GROUP, name))

    async def ack(self, entry_id: bytes) -> None:
        partition, stream_id = _split(entry_id)
        stream = keys.outbox(partition)
        async with (await _redis(self._at(stream))).pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, stream_id)
            pipe.xdel(stream, stream_id)
            await _redis(pipe.execute())

    async def ack_many(self, entry_ids: Sequence[bytes]) -> None:
        """`ack` of many entries: XACK and XDEL of each partition's ids in one MULTI (so that
        an entry is never acknowledged yet left in its stream, counted as pending forever).
        On one Redis every partition is in one MULTI; a Cluster refuses a MULTI across
        slots, so there each partition has its own, sent side by side."""
        by_partition: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            partition, stream_id = _split(entry_id)
            by_partition.setdefault(partition, []).append(stream_id)
        if not by_partition:
            return

        async def ack(partitions: list[int]) -> None:
            client = await _redis(self._at(keys.outbox(partitions[0])))
            async with client.pipeline(transaction=True) as pipe:
                for partition in partitions:
                    stream = keys.outbox(partition)
                    pipe.xack(stream, GROUP, *by_partition[partition])
                    pipe.xdel(stream, *by_partition[partition])
                await _redis(pipe.execute())

        if not self._cluster:
            await ack(list(by_partition))
            return
        # A few at a time: each holds a connection of its node's pool, which requests share.
        at_once = asyncio.Semaphore(ACKS_AT_ONCE)

        async def ack_one(partition: int) -> None:
            async with at_once:
                await ack([partition])

        await asyncio.gather(*(ack_one(p) for p in by_partition))

    async def park(self, delivery: Delivery, error: str, attempts: int) -> int:
        """Move the entry to its partition's dead-letter stream with its last error, in one
        MULTI; returns how many entries the dead-letter streams hold now."""
        partition, stream_id = _split(delivery.id)
        stream = keys.outbox(partition)
        async with (await _redis(self._at(stream))).pipeline(transaction=True) as pipe:
            dead: dict[Any, Any] = {
                **delivery.raw,
                b"error": error.encode(),
                b"id": stream_id.encode(),
                b"attempts": str(attempts).encode(),
                b"parked_at": str(int(time.time())).encode(),
            }
            pipe.xadd(keys.dead_letters(partition), dead)
            pipe.xack(stream, GROUP, stream_id)
            pipe.xdel(stream, stream_id)
            await _redis(pipe.execute())
        return await self.dead_letters()

    async def dead_letters(self) -> int:
        return await self._sum_xlen(keys.dead_letters)

    async def pending(self) -> int:
        return await self._sum_xlen(keys.outbox)

    async def _sum_xlen(self, stream: Any) -> int:
        replies = await self._each(lambda pipe, p: pipe.xlen(stream(p)))
        for reply in replies:
            if isinstance(reply, Exception):
                raise BackendUnavailable("redis", f"{type(reply).__name__}: {reply}")
        return sum(int(r) for r in replies)

    async def oldest_age_s(self) -> float:
        """How long the oldest entry not yet in MongoDB has waited (0 with none)."""
        replies = await self._each(lambda pipe, p: pipe.xrange(keys.outbox(p), count=1))
        # A stream id starts with its entry's creation time in milliseconds.
        oldest = [
            int(r[0][0].split(b"-")[0]) for r in replies if r and not isinstance(r, Exception)
        ]
        return max(0.0, time.time() - min(oldest) / 1000) if oldest else 0.0

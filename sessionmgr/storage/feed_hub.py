"""The read side of the change feed: one shared reader per replica, fanning out to subscribers.

Subscribers never hold a Redis connection of their own. One task runs `XREAD BLOCK` over the
feed streams of every session that has a subscriber on this replica (one connection), and
puts each entry on the bounded queue of each of that session's subscribers. A subscriber
opening (or resuming) reads its backlog once with XRANGE on the shared pool.

Positions are the streams' entry ids. A position is honoured only while the stream still
holds that very entry: entries leave a stream only from its front (MAXLEN) or all at once
(the key expires), so then every entry after it is still there too. Otherwise the subscriber
gets one `reset` first. A subscriber whose queue fills (it reads too slowly) loses what was
queued and gets `reset` in its place, never a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.domain.errors import BackendUnavailable, TooManyStreams
from sessionmgr.metrics import Metrics
from sessionmgr.storage import feed, keys

log = logging.getLogger(__name__)

POSITION = re.compile(r"^\d{1,20}-\d{1,20}$")
NO_POSITION = "0-0"  # the position before any entry of a stream that does not exist yet
_READ_COUNT = 500
_encode = msgspec.json.Encoder().encode
_HUBS: weakref.WeakSet[FeedHub] = weakref.WeakSet()


class FeedItem(NamedTuple):
    id: str
    kind: str
    data: bytes


class _Mark(NamedTuple):
    """Not an entry: `reset` (the queue overflowed) or `end` (the replica is stopping)."""

    what: str


_RESET, _END = _Mark("reset"), _Mark("end")


def drain_all() -> None:
    """SIGTERM (the HTTP server's shutdown): every hub ends its streams now."""
    for hub in list(_HUBS):
        hub.drain()


def _version(data: bytes) -> int:
    return int(msgspec.json.decode(data)["version"])


def reset_item(session_id: str, position: str, version: int, reason: str) -> FeedItem:
    data = {"session_id": session_id, "version": version, "kind": "reset", "reason": reason}
    return FeedItem(position, "reset", _encode(data))


def _later(a: str, b: str) -> bool:
    """Whether stream id `a` comes after `b`."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq)) > (int(bms), int(bseq))


class Subscription:
    """One open stream: its bounded queue and the position it has been given up to."""

    def __init__(self, session_id: str, principal: str, bound: int) -> None:
        self.session_id = session_id
        self.principal = principal
        self._bound = bound
        # Two places more than the bound, so that the marks always fit.
        self._queue: asyncio.Queue[FeedItem | _Mark] = asyncio.Queue(bound + 2)
        self._skipped: FeedItem | None = None  # the newest entry dropped since the overflow
        self.start = NO_POSITION  # the position it opened at

    def offer(self, item: FeedItem) -> bool:
        """Queue `item`; on overflow drop the queue for one `reset`. False when it overflowed."""
        if self._skipped is not None:
            self._skipped = item
            return True
        if self._queue.qsize() < self._bound:
            self._queue.put_nowait(item)
            return True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._skipped = item
        self._queue.put_nowait(_RESET)
        return False

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)

    async def next(self, timeout_s: float) -> FeedItem | _Mark | None:
        """The next item or mark; None after `timeout_s` of nothing (time for a heartbeat)."""
        try:
            got = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if got is _RESET:
            skipped, self._skipped = self._skipped, None
            assert skipped is not None
            return reset_item(self.session_id, skipped.id, _version(skipped.data), "overflow")
        return got


class FeedHub:
    """Subscriptions of this replica and the one reader that serves them all."""

    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        metrics: Metrics,
        *,
        block_ms: int = 1000,
        queue_size: int = 256,
        max_per_principal: int = 16,
        heartbeat_s: float = 15.0,
        poll_ms: int = 50,
    ) -> None:
        self._redis = redis  # the shared pool: backlogs, CLIENT UNBLOCK
        self._reader = reader  # one connection, blocked in XREAD most of the time
        # On a Cluster the reader polls instead (`_poll`): no XREAD spans slots.
        self._cluster = hasattr(reader, "nodes_manager")
        self._poll_ms = poll_ms
        self._metrics = metrics
        self._block_ms = block_ms
        self._bound = queue_size
        self._cap = max_per_principal
        self.heartbeat_s = heartbeat_s
        self._subs: dict[str, set[Subscription]] = {}
        self._positions: dict[str, str] = {}  # session id -> the reader's position in its feed
        self._open: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._reader_id: int | None = None
        self._waking: asyncio.Task[None] | None = None
        self._draining = False
        self._stopped = False
        _HUBS.add(self)

    @property
    def draining(self) -> bool:
        return self._draining

    async def open(
        self, session_id: str, principal: str, since: str | None, version: int
    ) -> tuple[Subscription, list[FeedItem]]:
        """Subscribe; returns the subscription and what comes before its live entries: a
        `reset` when `since` is no longer retained, then the backlog after the position."""
        if self._draining:
            raise BackendUnavailable("redis", "this replica is stopping; reconnect", 1)
        if self._open[principal] >= self._cap:
            raise TooManyStreams(self._cap)
        self._open[principal] += 1  # held from here: concurrent opens count at once
        try:
            return await self._open_held(session_id, principal, since, version)
        except BaseException:
            self._release(principal)
            raise

    async def _open_held(
        self, session_id: str, principal: str, since: str | None, version: int
    ) -> tuple[Subscription, list[FeedItem]]:
        key = feed.feed_key(session_id)
        first: list[FeedItem] = []
        start = since
        if since is None or not await self._retained(key, since):
            last = await self._call(self._redis.xrevrange(key, count=1))
            start = last[0][0].decode() if last else NO_POSITION
            if since is not None:
                if last:
                    version = max(version, _version(last[0][1][b"d"]))
                first.append(reset_item(session_id, start, version, "gone"))
                self._metrics.feed_resets.labels("gone").inc()
        assert start is not None
        sub = Subscription(session_id, principal, self._bound)
        sub.start = start
        self._register(sub, start)
        try:
            # After registering: whatever the reader hands on from now on is after this.
            backlog = await self._call(self._redis.xrange(key, min="(" + start, max="+"))
        except BaseException:
            self._unregister(sub)
            raise
        first += [FeedItem(i.decode(), f[b"k"].decode(), f[b"d"]) for i, f in backlog]
        return sub, first

    def events(self, sub: Subscription, first: list[FeedItem]) -> AsyncIterator[FeedItem | None]:
        """What the stream sends, in order, once each: `first`, then the live entries past
        them; None is a heartbeat. Ends when the replica drains; closes `sub` at the end,
        or when the iterator is dropped unstarted (a client gone before its first byte)."""
        stream = self._events(sub, first)
        weakref.finalize(stream, self.close, sub)
        return stream

    async def _events(
        self, sub: Subscription, first: list[FeedItem]
    ) -> AsyncIterator[FeedItem | None]:
        try:
            last = sub.start  # nothing at or before it is sent again
            for item in first:
                if item.kind != "reset":
                    last = item.id
                yield item
            while not self._draining:
                got = await sub.next(self.heartbeat_s)
                if got is None:
                    yield None
                    continue
                if isinstance(got, _Mark):
                    return
                if got.kind == "reset":
                    self._metrics.feed_resets.labels("overflow").inc()
                    last = got.id
                elif not _later(got.id, last):
                    continue  # already sent from the backlog
                else:
                    last = got.id
                    self._metrics.feed_events.labels(got.kind).inc()
                    ms = int(got.id.partition("-")[0])
                    self._metrics.feed_lag.observe(max(0.0, time.time() - ms / 1000))
                yield got
        finally:
            self.close(sub)

    def close(self, sub: Subscription) -> None:
        """End a subscription (idempotent): its queue and its place under the cap go."""
        if self._unregister(sub):
            self._release(sub.principal)

    def _release(self, principal: str) -> None:
        self._open[principal] -= 1
        if self._open[principal] <= 0:
            del self._open[principal]

    def _unregister(self, sub: Subscription) -> bool:
        subs = self._subs.get(sub.session_id)
        if subs is None or sub not in subs:
            return False
        subs.discard(sub)
        if not subs:
            del self._subs[sub.session_id]
            self._positions.pop(sub.session_id, None)
        self._metrics.feed_streams.dec()
        return True

    def drain(self) -> None:
        """End every stream (their clients reconnect to another replica) and refuse new ones."""
        self._draining = True
        for subs in self._subs.values():
            for sub in subs:
                sub.end()

    async def stop(self) -> None:
        self.drain()
        self._stopped = True  # redis-py may turn the cancel below into a connection error
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _register(self, sub: Subscription, start: str) -> None:
        new_session = sub.session_id not in self._subs
        self._subs.setdefault(sub.session_id, set()).add(sub)
        self._metrics.feed_streams.inc()
        if new_session:
            self._positions[sub.session_id] = start
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_forever(), name="feed-reader")
        elif new_session:
            self._task_wake()

    def _task_wake(self) -> None:
        """Cut the reader's current XREAD short, so that it reads the new stream too (one
        CLIENT UNBLOCK at a time: the next XREAD reads every stream registered by then)."""
        if self._reader_id is not None and self._waking is None:
            self._waking = asyncio.create_task(self._unblock(self._reader_id))

    async def _unblock(self, client_id: int) -> None:
        try:
            await self._redis.client_unblock(client_id)
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("feed reader not unblocked (%s); it wakes within its block time", exc)
        finally:
            self._waking = None

    async def _retained(self, key: str, position: str) -> bool:
        return bool(await self._call(self._redis.xrange(key, min=position, max=position, count=1)))

    async def _read_forever(self) -> None:
        while self._subs and not self._stopped:
            try:
                if self._reader_id is None and not self._cluster:
                    self._reader_id = int(await self._reader.client_id())
                streams = {feed.feed_key(s): p for s, p in self._positions.items()}
                if not streams:  # the last subscriber left meanwhile
                    continue
                got: Any = await (
                    self._poll(streams)
                    if self._cluster
                    else self._reader.xread(
                        streams,  # type: ignore[arg-type]
                        count=_READ_COUNT,
                        block=self._block_ms,
                    )
                )
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("change feed reader: Redis failed (%s); retrying", exc)
                self._reader_id = None
                await asyncio.sleep(0.5)
                continue
            for key, entries in got or []:
                self._fan_out(key.decode(), entries)

    async def _poll(self, streams: dict[str, str]) -> list[Any]:
        """A Cluster refuses one XREAD across slots: read each stream without blocking, one
        pipeline per node, and wait `poll_ms` after a round that found nothing."""
        async with self._reader.pipeline(transaction=False) as pipe:
            for key, position in streams.items():
                pipe.xread({key: position}, count=_READ_COUNT)
            replies = await pipe.execute()
        got = [stream for reply in replies for stream in reply or []]
        if not got:
            await asyncio.sleep(self._poll_ms / 1000)
        return got

    def _fan_out(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        session_id = keys.session_id_in(key)
        subs = self._subs.get(session_id)
        if not subs or not entries:
            return
        self._positions[session_id] = entries[-1][0].decode()
        for raw_id, fields in entries:
            item = FeedItem(raw_id.decode(), fields[b"k"].decode(), fields[b"d"])
            for sub in subs:
                sub.offer(item)

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (
            RedisConnectionError,
            RedisTimeoutError,
            ClusterDownError,
            RedisClusterException,
            OSError,
        ) as exc:
            raise BackendUnavailable("redis", "not reachable") from exc


async def open_feed_hub(
    redis: Redis, reader: Redis, metrics: Metrics, settings: Any
) -> AsyncIterator[FeedHub]:
    """A container resource: the hub, stopped (its streams ended) with the app."""
    hub = FeedHub(
        redis,
        reader,
        metrics,
        queue_size=settings.feed_queue_size,
        max_per_principal=settings.feed_max_streams_per_principal,
        heartbeat_s=settings.feed_heartbeat_s,
    )
    try:
        yield hub
    finally:
        await hub.stop()

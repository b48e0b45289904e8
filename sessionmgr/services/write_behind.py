"""The write-behind worker: carries the Redis outbox to MongoDB, losing nothing.

Every replica runs one, all in one consumer group. An entry is acknowledged (and deleted) only
after MongoDB has it; entries a dead consumer left pending are claimed after
`claim_idle_ms`; an entry that keeps failing for reasons other than MongoDB being down is
parked on a dead-letter stream after `max_deliveries` attempts, with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from opentelemetry import context, trace
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.metrics import Metrics
from sessionmgr.services.ports import WarmStore
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM, OutboxEntry

log = logging.getLogger(__name__)
GROUP = "writebehind"
DEPARTED_AFTER_MS = 3_600_000
DEAD_LETTER_MAX = 100_000  # parked entries kept for an operator to inspect, oldest dropped
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WriteBehindWorker:
    def __init__(
        self,
        redis: Redis,
        warm: WarmStore,
        *,
        consumer: str | None = None,
        batch: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._redis = redis
        self._stop = asyncio.Event()
        self._warm = warm
        self.consumer = consumer or consumer_name()
        self._batch = batch
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._failures: dict[bytes, int] = {}
        self._last_claim = 0.0
        self._retry_own = True  # a restarted consumer may hold entries from before
        self.delivered = 0
        self.parked = 0
        self._metrics = metrics or Metrics()
        self._tracer = tracer or trace.NoOpTracer()

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(OUTBOX_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; finishes the entry in hand before returning."""
        backoff, group_ready = 0.1, False
        self._stop = stop
        log.info("write-behind worker %s started", self.consumer)
        while not stop.is_set():
            try:
                await self.export_backlog()
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self.step()
                backoff = 0.1
            except (BackendUnavailable, RedisError, OSError) as exc:
                # A Redis that restarted empty has lost the group too: create it again.
                group_ready = False
                log.warning("write-behind paused %.1fs: %s", backoff, exc)
                await self._pause(stop, backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # A bug must not stop delivery for good: log it loudly and keep going.
                log.exception("write-behind step failed; retrying in %.1fs", backoff)
                await self._pause(stop, backoff)
                backoff = min(backoff * 2, 5.0)
        log.info("write-behind worker %s stopped", self.consumer)

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def step(self, *, block_ms: int | None = None) -> int:
        """One round: claim stale entries, retry our own pending ones, read new ones."""
        done = 0
        if time.monotonic() - self._last_claim >= self._claim_idle_ms / 1000 / 2:
            done += await self.claim_stale()
        if self._retry_own:
            done += await self._read("0", block_ms=None)
        done += await self._read(">", block_ms=self._block_ms if block_ms is None else block_ms)
        return done

    async def claim_stale(self) -> int:
        """Take over entries other consumers left pending for longer than `claim_idle_ms`."""
        self._last_claim = time.monotonic()
        start, done = "0-0", 0
        while True:
            reply = await self._redis.xautoclaim(
                OUTBOX_STREAM, GROUP, self.consumer, self._claim_idle_ms, start, count=self._batch
            )
            start, entries = reply[0], reply[1]
            if entries:
                log.info("claimed %d stale outbox entries", len(entries))
                done += await self._deliver(entries)
            if start in (b"0-0", "0-0") or not entries:
                await self.forget_departed()
                await self._count_dead_letters()
                return done

    async def forget_departed(self) -> int:
        """Remove consumers of replicas long gone: idle past `DEPARTED_AFTER_MS`, none pending.

        Every replica start adds a consumer name; without this the group lists them forever.
        """
        removed = 0
        for info in await self._redis.xinfo_consumers(OUTBOX_STREAM, GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.consumer and not info["pending"] and info["idle"] > DEPARTED_AFTER_MS:
                await self._redis.xgroup_delconsumer(OUTBOX_STREAM, GROUP, name)
                removed += 1
        if removed:
            log.info("removed %d departed write-behind consumers", removed)
        return removed

    async def _read(self, offset: str, block_ms: int | None) -> int:
        reply: Any = await self._redis.xreadgroup(
            GROUP, self.consumer, {OUTBOX_STREAM: offset}, count=self._batch, block=block_ms
        )
        entries = [e for e in reply[0][1] if e[1]] if reply else []  # deleted ids have no body
        if offset == "0" and not entries:
            self._retry_own = False
        return await self._deliver(entries)

    async def _deliver(self, entries: list[Any]) -> int:
        if not entries:
            return 0
        done = 0
        # A trace of its own per batch (not a child of whatever started the worker).
        with self._tracer.start_as_current_span(
            "write-behind deliver",
            context=context.Context(),
            attributes={"sessionmgr.outbox_entries": len(entries)},
        ):
            for entry_id, fields in entries:
                if self._stop.is_set():
                    break  # shutting down: the rest stay pending for another replica to claim
                if await self._deliver_one(entry_id, fields):
                    done += 1
        return done

    async def _deliver_one(self, entry_id: bytes, fields: dict[bytes, bytes]) -> bool:
        try:
            entry = _decode_entry(fields[b"entry"])
        except (KeyError, msgspec.DecodeError) as exc:
            await self._park(entry_id, fields, f"undecodable entry: {exc}")
            return False
        try:
            await self._warm.apply(entry.record, entry.events, entry.context)
        except BackendUnavailable:
            self._retry_own = True
            self._metrics.write_behind_entries.labels("retried").inc()
            raise  # MongoDB is down: keep it pending, the run loop backs off
        except Exception as exc:
            return await self._failed(entry_id, fields, entry, exc)
        await self._ack(entry_id)
        self._failures.pop(entry_id, None)
        self.delivered += 1
        self._metrics.write_behind_entries.labels("applied").inc()
        return True

    async def _failed(
        self, entry_id: bytes, fields: dict[bytes, bytes], entry: OutboxEntry, exc: Exception
    ) -> bool:
        self._retry_own = True
        count = self._failures.get(entry_id, 0) + 1
        self._failures[entry_id] = count
        delivered = await self._times_delivered(entry_id)
        log.error(
            "write-behind of session %s v%d failed (attempt %d): %r",
            entry.record.id,
            entry.record.version,
            max(count, delivered),
            exc,
        )
        if max(count, delivered) >= self._max_deliveries:
            await self._park(entry_id, fields, repr(exc))
        else:
            self._metrics.write_behind_entries.labels("retried").inc()
        return False

    async def _times_delivered(self, entry_id: bytes) -> int:
        pending = await self._redis.xpending_range(
            OUTBOX_STREAM, GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _park(self, entry_id: bytes, fields: dict[bytes, bytes], error: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            dead: dict[Any, Any] = {**fields, b"error": error.encode(), b"id": entry_id}
            pipe.xadd(DEAD_LETTER_STREAM, dead, maxlen=DEAD_LETTER_MAX, approximate=True)
            pipe.xack(OUTBOX_STREAM, GROUP, entry_id)
            pipe.xdel(OUTBOX_STREAM, entry_id)
            pipe.xlen(DEAD_LETTER_STREAM)
            *_, dead_letters = await pipe.execute()
        self._failures.pop(entry_id, None)
        self.parked += 1
        self._metrics.write_behind_entries.labels("parked").inc()
        self._metrics.outbox_dead_letters.set(dead_letters)
        log.error("outbox entry %s parked on %s: %s", entry_id.decode(), DEAD_LETTER_STREAM, error)

    async def _count_dead_letters(self) -> None:
        """The dead-letter stream is shared by every replica and trimmed by operators."""
        self._metrics.outbox_dead_letters.set(await self._redis.xlen(DEAD_LETTER_STREAM))

    async def _ack(self, entry_id: bytes) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(OUTBOX_STREAM, GROUP, entry_id)
            pipe.xdel(OUTBOX_STREAM, entry_id)
            await pipe.execute()

    async def pending(self) -> int:
        """Entries written but not yet in MongoDB (the outbox lag, in entries).

        The stream is exactly that: an entry leaves it (XACK + XDEL) once MongoDB has it.
        """
        return int(await self._redis.xlen(OUTBOX_STREAM))

    async def export_backlog(self) -> None:
        """Set the outbox gauges: entries not in MongoDB yet, and the age of the oldest."""
        pending = await self.pending()
        oldest: Any = await self._redis.xrange(OUTBOX_STREAM, count=1) if pending else []
        # A stream id starts with its entry's creation time in milliseconds.
        lag_s = time.time() - int(oldest[0][0].split(b"-")[0]) / 1000 if oldest else 0.0
        self._metrics.outbox_pending.set(pending)
        self._metrics.outbox_lag.set(max(0.0, lag_s))


@contextlib.asynccontextmanager
async def running(worker: WriteBehindWorker) -> AsyncIterator[WriteBehindWorker]:
    """Run the worker in the background for the life of the app; stop it after its entry."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name=f"write-behind-{worker.consumer}")
    task.add_done_callback(_report_crash)
    try:
        yield worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            log.error("write-behind worker did not stop in 10s; its entries stay pending")


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("write-behind worker crashed", exc_info=task.exception())

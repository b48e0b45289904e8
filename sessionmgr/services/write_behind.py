"""The write-behind worker: carries the Redis outbox to MongoDB, losing nothing.

Every replica runs one, all in one consumer group. An entry is acknowledged (and deleted) only
after MongoDB has it; entries a dead consumer left pending are claimed after
`claim_idle_ms`. An outage (any error every entry would get now) never costs an entry
anything: it stays pending and the worker backs off. Only an entry MongoDB refuses for its own
content, `max_deliveries` times over at least `park_after_s` while others go through, is
parked on a dead-letter stream that is never trimmed, with its last error.

What a round reads is written as batches of up to `batch` entries and `BATCH_BYTES` bytes
(`WarmStore.apply_many`: a few round trips for the whole batch) and acknowledged at once
(`Outbox.ack_many`); what the batch leaves (a clash, a session gone), or a whole batch MongoDB
refuses for its content, goes one entry at a time. A round asks the outbox for `READ_PAGE`
entries at a time (one read brings about that, a few from every partition), and asks again
while reads come back full, until it holds a batch or `BATCH_BYTES`: a backlog goes to MongoDB
in batches of `batch` (fewer round trips per entry), while one read is no larger than before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
from opentelemetry import context, trace

from sessionmgr.domain.errors import BackendUnavailable, WriteContended, describe
from sessionmgr.metrics import Metrics
from sessionmgr.services.divergence import Reconciler
from sessionmgr.services.ports import Delivery, Outbox, OutboxEntry, WarmStore, WriteDiverged

log = logging.getLogger(__name__)
DEPARTED_AFTER_MS = 3_600_000
# The outbox gauges are read again at most this often (each read covers every partition).
EXPORT_EVERY_S = 0.5
READ_PAGE = 100  # entries asked of the outbox at once (a read, a claim, a page of pending)
BATCH_BYTES = 8 * 1024 * 1024  # a batch, and what a round reads, stops at this many bytes


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _Failure(msgspec.Struct):
    """An entry MongoDB refused for its content: when it first failed, how often, why."""

    first_at: float
    attempts: int
    error: str
    next_at: float


class WriteBehindWorker:
    def __init__(
        self,
        outbox: Outbox,
        warm: WarmStore,
        *,
        consumer: str | None = None,
        batch: int = 1000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        park_after_s: float = 900.0,
        backoff_max_s: float = 5.0,
        refused_retry_s: float = 1.0,
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
        reconciler: Reconciler | None = None,
    ) -> None:
        self._outbox = outbox
        self._stop = asyncio.Event()
        self._warm = warm
        self.consumer = consumer or consumer_name()
        self._batch = batch
        self._page = min(batch, READ_PAGE)
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._park_after_s = park_after_s
        self._backoff_max_s = backoff_max_s
        self._refused_retry_s = refused_retry_s
        self._failures: dict[bytes, _Failure] = {}
        self._last_applied = 0.0  # monotonic time MongoDB last took an entry
        self._last_claim = 0.0
        self._last_export = 0.0
        self._retry_own = True  # a restarted consumer may hold entries from before
        self.delivered = 0
        self.parked = 0
        self._metrics = metrics or Metrics()
        self._tracer = tracer or trace.NoOpTracer()
        self._reconciler = reconciler

    async def ensure_group(self) -> None:
        await self._outbox.ensure_group()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; finishes the entry in hand before returning.

        While a backend is out (MongoDB refusing every write, or Redis gone) nothing is given
        up: the worker waits, twice as long each time up to `backoff_max_s`, with jitter so
        that replicas do not retry in step, and every entry stays pending.
        """
        failures, group_ready = 0, False
        self._stop = stop
        log.info("write-behind worker %s started", self.consumer)
        while not stop.is_set():
            try:
                if time.monotonic() - self._last_export >= EXPORT_EVERY_S:
                    await self.export_backlog()
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self.step()
                if failures:
                    log.info("write-behind resumed after %d failed tries", failures)
                failures = 0
                self._metrics.write_behind_backoff.set(0)
            except (BackendUnavailable, OSError) as exc:
                # A Redis that restarted empty has lost the group too: create it again.
                group_ready = False
                failures += 1
                wait = self.backoff(failures)
                log.warning("write-behind paused %.1fs (try %d): %s", wait, failures, exc)
                self._metrics.write_behind_backoff.set(wait)
                await self._pause(stop, wait)
            except Exception:
                # A bug must not stop delivery for good: log it loudly and keep going.
                failures += 1
                wait = self.backoff(failures)
                log.exception("write-behind step failed; retrying in %.1fs", wait)
                await self._pause(stop, wait)
        log.info("write-behind worker %s stopped", self.consumer)

    def backoff(self, failures: int) -> float:
        """0.1 s, doubling per failed try, capped; "full jitter" over the upper half."""
        ceiling = min(self._backoff_max_s, 0.1 * 2.0 ** min(failures - 1, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - not a secret

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def step(self, *, block_ms: int | None = None) -> int:
        """One round: claim stale entries, retry our own pending ones, read new ones."""
        done = 0
        if time.monotonic() - self._last_claim >= self._claim_idle_ms / 1000 / 2:
            done += await self.claim_stale()
        if self._retry_own and self._retry_due():
            done += await self._retry_pending()
        done += await self._read(">", block_ms=self._block_ms if block_ms is None else block_ms)
        return done

    def _retry_due(self) -> bool:
        """Our pending entries are worth reading again: one failed for an outage (no schedule)
        or the earliest scheduled retry of an entry MongoDB refused has come."""
        if not self._failures:
            return True
        return min(f.next_at for f in self._failures.values()) <= time.monotonic()

    async def _retry_pending(self) -> int:
        """Read our whole pending list again, page by page, and deliver what is due."""
        start: str | bytes = "0"
        done, seen = 0, 0
        while True:
            page = await self._outbox.read(self.consumer, start, self._page)
            seen += len(page)
            done += await self._deliver(page)
            if len(page) < self._page:
                break
            start = page[-1].id
        if not seen:
            self._retry_own = False
            self._failures.clear()
        return done

    async def claim_stale(self) -> int:
        """Take over entries other consumers left pending for longer than `claim_idle_ms`."""
        self._last_claim = time.monotonic()
        start, done = "0-0", 0
        while True:
            start, entries = await self._outbox.claim(
                self.consumer, self._claim_idle_ms, start, self._page
            )
            if entries:
                log.info("claimed %d stale outbox entries", len(entries))
                done += await self._deliver(entries)
            if start == "0-0" or not entries:
                await self.forget_departed()
                await self._count_dead_letters()
                return done

    async def forget_departed(self) -> int:
        """Remove consumers of replicas long gone: idle past `DEPARTED_AFTER_MS`, none pending.

        Every replica start adds a consumer name; without this the group lists them forever.
        """
        removed = 0
        for info in await self._outbox.consumers():
            name = info.name
            if name != self.consumer and not info.pending and info.idle_ms > DEPARTED_AFTER_MS:
                await self._outbox.remove_consumer(name)
                removed += 1
        if removed:
            log.info("removed %d departed write-behind consumers", removed)
        return removed

    async def _read(self, offset: str, block_ms: int | None) -> int:
        """New entries, page after page while each page comes back full (a backlog), until
        a batch is in hand; only the first read waits for entries."""
        found = await self._outbox.read(self.consumer, offset, self._page, block_ms)
        page, held = found, _bytes(found)
        while (
            offset == ">"
            and len(page) >= self._page
            and len(found) < self._batch
            and held < BATCH_BYTES
        ):
            page = await self._outbox.read(self.consumer, offset, self._page)
            found += page
            held += _bytes(page)
        return await self._deliver(found)

    def _batches(self, ready: list[Delivery]) -> Iterator[list[Delivery]]:
        """`ready` in order, cut into batches of at most `batch` entries and `BATCH_BYTES`
        (an entry larger than that alone)."""
        batch: list[Delivery] = []
        held = 0
        for delivery in ready:
            size = _bytes([delivery])
            if batch and (len(batch) >= self._batch or held + size > BATCH_BYTES):
                yield batch
                batch, held = [], 0
            batch.append(delivery)
            held += size
        if batch:
            yield batch

    async def _deliver(self, entries: list[Delivery]) -> int:
        if not entries:
            return 0
        done = 0
        # A trace of its own per batch (not a child of whatever started the worker).
        with self._tracer.start_as_current_span(
            "write-behind deliver",
            context=context.Context(),
            attributes={"sessionmgr.outbox_entries": len(entries)},
        ):
            ready: list[Delivery] = []
            for delivery in entries:
                if delivery.deleted:  # deleted from the stream, still in our pending list
                    await self._outbox.ack(delivery.id)
                    continue
                failure = self._failures.get(delivery.id)
                if failure is not None and failure.next_at > time.monotonic():
                    continue  # refused before; its next try is not due yet
                ready.append(delivery)
            for batch in self._batches(ready):
                if self._stop.is_set():
                    break  # shutting down: the rest stay pending for another replica to claim
                applied, left = await self._deliver_batch(batch)
                done += applied
                for delivery in left:  # before the next batch: a session's order is kept
                    if self._stop.is_set():
                        break
                    if await self._deliver_one(delivery):
                        done += 1
        return done

    async def _deliver_batch(self, batch: list[Delivery]) -> tuple[int, list[Delivery]]:
        """Deliver a batch in one `apply_many` and acknowledge it in one go; returns how many,
        and the entries left to deliver one at a time: those the warm store left (a clash, a
        session gone), undecodable ones (to be parked), or all of them when MongoDB refused
        the batch for its content. An outage raises as for one entry: it all stays pending."""
        whole = [(d, d.entry) for d in batch if d.entry is not None]
        if len(whole) < 2:
            return 0, batch
        try:
            left = set(await self._warm.apply_many([entry for _d, entry in whole]))
        except BackendUnavailable:
            self._outage(len(whole))
            raise
        except Exception as exc:
            log.warning(
                "write-behind batch of %d refused (%s); delivering it one entry at a time",
                len(whole),
                describe(exc),
            )
            return 0, batch
        applied = [d for i, (d, _entry) in enumerate(whole) if i not in left]
        try:
            await self._outbox.ack_many([d.id for d in applied])
        except BackendUnavailable:
            self._retry_own = True  # in MongoDB, still pending: read again soon, harmlessly
            raise
        for delivery in applied:
            self._failures.pop(delivery.id, None)
        if applied:
            self._last_applied = time.monotonic()
            self.delivered += len(applied)
            self._metrics.write_behind_entries.labels("applied").inc(len(applied))
        taken = {d.id for d in applied}
        return len(applied), [d for d in batch if d.id not in taken]

    async def _deliver_one(self, delivery: Delivery) -> bool:
        entry = delivery.entry
        if entry is None:
            await self._park(delivery, delivery.problem, attempts=1)
            return False
        try:
            await self._warm.apply(entry.record, entry.events, entry.context)
        except WriteDiverged as diverged:
            # Redis lost writes MongoDB had: kept, counted, the session re-based (or, without
            # a reconciler, kept pending for one that has).
            if self._reconciler is None:
                raise
            if not await self._settle(self._reconciler, delivery, entry, diverged):
                return False
        except BackendUnavailable:
            self._outage()
            raise
        except Exception as exc:
            return await self._refused(delivery, entry, exc)
        await self._outbox.ack(delivery.id)
        self._failures.pop(delivery.id, None)
        self._last_applied = time.monotonic()
        self.delivered += 1
        self._metrics.write_behind_entries.labels("applied").inc()
        return True

    async def _settle(
        self, reconciler: Reconciler, delivery: Delivery, entry: OutboxEntry, d: WriteDiverged
    ) -> bool:
        """Keep the divergence and re-base its session; False when the entry has to wait: the
        re-base lost to the session's writers, or keeping it failed (a refusal like any)."""
        try:
            await reconciler.settle(d)
        except WriteContended as exc:
            return self._contended(delivery, entry, exc)
        except BackendUnavailable:
            self._outage()
            raise
        except Exception as exc:
            return await self._refused(delivery, entry, exc, "diverged, not kept")
        return True

    def _outage(self, entries: int = 1) -> None:
        """An outage: every entry would fail the same way now. They stay pending, count
        nothing against themselves, and the run loop backs off."""
        self._retry_own = True
        self._metrics.write_behind_entries.labels("retried").inc(entries)

    def _failure_of(self, delivery: Delivery, now: float, error: str = "") -> _Failure:
        """The entry's record of failed tries, new if it had none; our pending list is to be
        read again."""
        self._retry_own = True
        return self._failures.setdefault(
            delivery.id, _Failure(first_at=now, attempts=0, error=error, next_at=now)
        )

    async def _refused(
        self,
        delivery: Delivery,
        entry: OutboxEntry,
        exc: Exception,
        how: str = "refused by MongoDB",
    ) -> bool:
        """MongoDB refused this entry (not an outage). Retry it on a growing schedule; park it
        only when it has failed `max_deliveries` times over at least `park_after_s` while
        other entries went through: when every entry fails alike, MongoDB is what is wrong."""
        now = time.monotonic()
        failure = self._failure_of(delivery, now)
        failure.attempts += 1
        failure.error = describe(exc)
        failure.next_at = now + min(60.0, self._refused_retry_s * 2 ** (failure.attempts - 1))
        others_applied = self._last_applied > failure.first_at
        log.error(
            "write-behind of session %s v%d %s (attempt %d): %s",
            entry.record.id,
            entry.record.version,
            how,
            failure.attempts,
            failure.error,
            extra={"session_id": entry.record.id},
        )
        if (
            failure.attempts >= self._max_deliveries
            and now - failure.first_at >= self._park_after_s
            and others_applied
        ):
            await self._park(delivery, failure.error, attempts=failure.attempts)
        else:
            self._metrics.write_behind_entries.labels("retried").inc()
        return False

    def _contended(self, delivery: Delivery, entry: OutboxEntry, exc: WriteContended) -> bool:
        """The session's re-base lost to its writers (kept in MongoDB's conflicts already):
        nothing is wrong with the entry, so it stays pending, counts no attempt toward
        parking, and is tried again after `refused_retry_s`."""
        now = time.monotonic()
        failure = self._failure_of(delivery, now, describe(exc))
        failure.next_at = now + self._refused_retry_s
        self._metrics.write_behind_entries.labels("retried").inc()
        log.warning(
            "write-behind of session %s v%d waits: %s",
            entry.record.id,
            entry.record.version,
            exc,
            extra={"session_id": entry.record.id},
        )
        return False

    async def _park(self, delivery: Delivery, error: str, *, attempts: int) -> None:
        """Move an entry to the dead-letter list, which is never trimmed: it stays there,
        with its last error, until an operator replays or drops it (`sessionmgr outbox`)."""
        dead_letters = await self._outbox.park(delivery, error, attempts)
        self._failures.pop(delivery.id, None)
        self.parked += 1
        self._metrics.write_behind_entries.labels("parked").inc()
        self._metrics.outbox_dead_letters.set(dead_letters)
        log.error(
            "outbox entry %s parked on %s: %s",
            delivery.id.decode(),
            self._outbox.dead_letter_name,
            error,
        )

    async def _count_dead_letters(self) -> None:
        """The dead-letter list is shared by every replica; only an operator empties it."""
        self._metrics.outbox_dead_letters.set(await self._outbox.dead_letters())

    async def pending(self) -> int:
        """Entries written but not yet in MongoDB (the outbox lag, in entries).

        The stream is exactly that: an entry leaves it (XACK + XDEL) once MongoDB has it.
        """
        return await self._outbox.pending()

    async def export_backlog(self) -> None:
        """Set the outbox gauges: entries not in MongoDB yet, and the age of the oldest (at
        most every `EXPORT_EVERY_S` from `run`: each reads every partition of the outbox)."""
        self._last_export = time.monotonic()
        pending = await self.pending()
        lag_s = await self._outbox.oldest_age_s() if pending else 0.0
        self._metrics.outbox_pending.set(pending)
        self._metrics.outbox_lag.set(max(0.0, lag_s))


def _bytes(deliveries: list[Delivery]) -> int:
    """What the entries take as the outbox holds them."""
    return sum(len(value) for d in deliveries for value in d.raw.values())


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

"""A bounded hot set: active sessions left alone are suspended, through the ordinary suspend.

A session with no write (and no load into Redis) and no live lease for
`SESSIONMGR_IDLE_SUSPEND_AFTER` is suspended: flushed to MongoDB with whatever the outbox
still holds for it (divergence handled as in every suspend), then dropped from Redis. Every
replica runs the sweep in the background; a lock with a TTL and a token lets one sweep run at
a time. Candidates come from the idle index (storage/idle.py), never a SCAN of Redis; each one
is checked on the session itself, and again under the suspend's WATCH, so a session written or
leased meanwhile stays hot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import msgspec

from sessionmgr.domain.errors import BackendUnavailable, ConcurrencyConflict
from sessionmgr.domain.model import SessionRecord
from sessionmgr.metrics import Metrics
from sessionmgr.services.ports import HotStore, IdleIndex, RecordCheck, SweepLock

log = logging.getLogger(__name__)

LOCK_TTL_MS = 60_000  # extended after each batch: a crashed sweeper holds it this long at most
Suspend = Callable[[str, RecordCheck], Awaitable[SessionRecord | None]]
Report = Callable[[str], None]


class StillInUse(Exception):
    """The session was written, or a lease taken, after it was found idle."""


class SweepResult(msgspec.Struct, kw_only=True):
    ran: bool = True  # False: another sweeper held the lock
    examined: int = 0
    suspended: list[str] = msgspec.field(default_factory=list)
    in_use: int = 0  # written or leased since; looked at again later
    gone: int = 0  # no longer hot (suspended, deleted): dropped from the index
    failed: list[str] = msgspec.field(default_factory=list)
    took_s: float = 0.0


class IdleSweeper:
    def __init__(
        self,
        hot: HotStore,
        suspend: Suspend,
        index: IdleIndex,
        lock: SweepLock,
        *,
        idle_after_s: float = 1800,
        batch: int = 100,
        max_batches: int = 50,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hot = hot
        self._suspend = suspend
        self._index = index
        self._lock = lock
        self.idle_after_s = idle_after_s
        self._batch = batch
        self._max_batches = max_batches
        self._metrics = metrics or Metrics()
        self._clock = clock

    async def sweep(
        self,
        *,
        dry_run: bool = False,
        idle_after_s: float | None = None,
        report: Report | None = None,
    ) -> SweepResult:
        """One sweep: at most `max_batches` batches of `batch` sessions, under the lock.

        A dry run takes no lock and changes nothing; `report` gets one line per session it
        would suspend (or did)."""
        started = time.monotonic()
        if dry_run:
            result = SweepResult()
            await self._batches(result, idle_after_s, None, report)
            result.took_s = time.monotonic() - started
            return result
        token = await self._lock.acquire(LOCK_TTL_MS)
        if token is None:
            self._metrics.idle_sweeps.labels("locked").inc()
            log.debug("idle sweep skipped: another sweeper holds the lock")
            return SweepResult(ran=False)
        result = SweepResult()
        try:
            await self._batches(result, idle_after_s, token, report)
        except BackendUnavailable:
            self._metrics.idle_sweeps.labels("error").inc()
            raise
        finally:
            result.took_s = time.monotonic() - started
            self._metrics.idle_sweep_latency.observe(result.took_s)
            with contextlib.suppress(BackendUnavailable):  # else its TTL ends it
                await self._lock.release(token)
        self._metrics.idle_sweeps.labels("done").inc()
        if result.suspended or result.failed:
            log.info(
                "idle sweep: %d suspended, %d in use, %d gone, %d failed in %.2fs",
                len(result.suspended),
                result.in_use,
                result.gone,
                len(result.failed),
                result.took_s,
            )
        return result

    async def _batches(
        self,
        result: SweepResult,
        idle_after_s: float | None,
        token: str | None,
        report: Report | None,
    ) -> None:
        cutoff = self._clock() - (idle_after_s or self.idle_after_s)
        kept = 0  # entries left in the index's idle range (failed, or a dry run's)
        for _ in range(self._max_batches):
            found = await self._index.older_than(cutoff, self._batch, offset=kept)
            for session_id, _ in found:
                result.examined += 1
                if not await self._one(session_id, cutoff, result, token is None, report):
                    kept += 1
            if len(found) < self._batch:
                return
            if token is not None and not await self._lock.extend(token, LOCK_TTL_MS):
                log.warning("idle sweep stopped: its lock lapsed (a batch took over a minute?)")
                return

    async def _one(
        self,
        session_id: str,
        cutoff: float,
        result: SweepResult,
        dry_run: bool,
        report: Report | None,
    ) -> bool:
        """Look at one candidate; False when it stays in the idle range (a dry run's
        candidate, or a failure), True when it left it (suspended, postponed or forgotten)."""
        try:
            view = await self._hot.load(session_id)
            if view is None:
                result.gone += 1
                if not dry_run:
                    await self._index.forget(session_id, cutoff)
                return not dry_run
            now = self._clock()
            if view.lease_ttl_ms or view.record.last_active.timestamp() > cutoff:
                result.in_use += 1
                if not dry_run:
                    await self._index.postpone(session_id, now)
                return not dry_run
            if dry_run:
                result.suspended.append(session_id)
                if report is not None:
                    report(f"would suspend {session_id}")
                return False
            done = await self._suspend_idle(session_id, cutoff, now, result)
            if report is not None and result.suspended[-1:] == [session_id]:
                report(f"suspended {session_id}")
            return done
        except BackendUnavailable:
            raise  # an outage: the whole sweep stops, the next one picks up from here
        except Exception:
            log.exception("idle sweep could not suspend session %s", session_id)
            result.failed.append(session_id)
            return False

    async def _suspend_idle(
        self, session_id: str, cutoff: float, now: float, result: SweepResult
    ) -> bool:
        idle_since = datetime.fromtimestamp(cutoff, UTC)
        at = datetime.fromtimestamp(now, UTC)

        def still_idle(record: SessionRecord) -> None:
            live = any(p.lease_expires_at > at for p in record.participants.values())
            if live or record.last_active > idle_since:
                raise StillInUse(session_id)

        try:
            record = await self._suspend(session_id, still_idle)
        except (StillInUse, ConcurrencyConflict):
            result.in_use += 1
            await self._index.postpone(session_id, now)
            return True
        await self._index.forget(session_id, cutoff)
        if record is None:
            result.gone += 1
            return True
        result.suspended.append(session_id)
        self._metrics.idle_suspended.inc()
        log.info(
            "session %s suspended after %.0fs idle",
            session_id,
            now - record.last_active.timestamp(),
            extra={"session_id": session_id},
        )
        return True

    async def backfill(self) -> int:
        """Index the hot sessions the index lacks (hot since before it existed): one SCAN."""
        added = await self._index.backfill()
        log.info("idle index backfilled: %d hot session(s) added", added)
        return added

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Sweep every `interval_s` (with jitter, so replicas do not line up) until `stop`."""
        while not stop.is_set():
            wait = interval_s * random.uniform(0.8, 1.2)  # noqa: S311 - not a secret
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            try:
                await self.sweep()
            except BackendUnavailable as exc:
                log.warning("idle sweep paused until the next round: %s", exc)
            except Exception:
                self._metrics.idle_sweeps.labels("error").inc()
                log.exception("idle sweep failed; trying again next round")


@contextlib.asynccontextmanager
async def sweeping(sweeper: IdleSweeper, interval_s: float) -> AsyncIterator[IdleSweeper]:
    """Run the sweep in the background for the life of the app."""
    stop = asyncio.Event()
    task = asyncio.create_task(sweeper.run(stop, interval_s), name="idle-sweep")
    try:
        yield sweeper
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            log.error("idle sweep did not stop in 10s")

"""Archive dormant sessions to S3 and bring them back (DESIGN §1-2), losing nothing at any step.

Archive, under the session's fence (no replica may load it into Redis meanwhile):
read the document and every event → gzip → PUT → verify (HEAD size, GET + SHA-256) → replace
the document by a stub, conditioned on its version → delete the events → check that nobody
restored it meanwhile (if so, put the events back). Rehydrate: GET → verify → insert the events
→ replace the stub by the document, conditioned on the stub → insert the events again.

Every step is idempotent, so a crash anywhere leaves a readable, complete session and a re-run
finishes the job: before the stub write MongoDB still holds everything; after it S3 does, and
the stub's `purge_pending` tells a sweep to finish the events delete. The object key is stable
per session (`sessions/<yyyy>/<mm>/<id>.json.gz`, from `created_at`) and the body of a version is
byte-for-byte the same each time, so re-archiving overwrites it harmlessly. The object is kept
after a rehydration (the next archive overwrites it; deleting the session deletes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import msgspec

from sessionmgr.domain.errors import (
    ArchiveInProgress,
    ArchiveUnreadable,
    BackendUnavailable,
    ConcurrencyConflict,
    OutboxEntriesParked,
    PreconditionFailed,
    SessionNotFound,
    WriteContended,
)
from sessionmgr.domain.model import ArchiveRef, SessionRecord, SessionState, utcnow
from sessionmgr.metrics import Metrics
from sessionmgr.services.ports import (
    ArchiveStore,
    HotStore,
    RecordCheck,
    SessionArchive,
    StoredSession,
    WarmArchive,
)

log = logging.getLogger(__name__)

FENCE_TTL_S = 300
"""Bounds how long a crashed archiver keeps a session from being loaded into Redis."""
FENCE_BUDGET_S = FENCE_TTL_S / 3
"""An archive past this stops before its next write: its fence must outlive every write."""

DELETE_FENCE_TTL_S = 60
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(SessionArchive).decode


class SessionIsHot(Exception):
    """The session is active in Redis: suspend it before archiving."""


class Archived(msgspec.Struct, frozen=True):
    """The stub; `by_us` is False when the session was archived already."""

    stub: StoredSession
    by_us: bool


def archive_key(session_id: str, created_at: datetime) -> str:
    return f"sessions/{created_at:%Y}/{created_at:%m}/{session_id}.json.gz"


def pack(archive: SessionArchive) -> bytes:
    """Deterministic bytes (no gzip timestamp): the same version always packs the same."""
    return gzip.compress(_encode(archive), compresslevel=6, mtime=0)


def unpack(session_id: str, body: bytes) -> SessionArchive:
    try:
        return _decode(gzip.decompress(body))
    except (OSError, EOFError, zlib.error, msgspec.DecodeError) as exc:
        raise ArchiveUnreadable(session_id, f"the object does not decode ({exc})") from None


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Archivist:
    """The archive and rehydrate use cases; callers decide access before calling them."""

    def __init__(
        self,
        hot: HotStore,
        warm: WarmArchive,
        cold: ArchiveStore,
        metrics: Metrics | None = None,
    ) -> None:
        self._hot = hot
        self._warm = warm
        self._cold = cold
        self._metrics = metrics or Metrics()
        self._rehydrating: dict[str, asyncio.Task[SessionRecord]] = {}

    # -- archive -----------------------------------------------------------------------------

    async def archive(self, session_id: str, check: RecordCheck | None = None) -> Archived:
        """Archive a session at rest (or finish an interrupted archive); returns the stub.

        Raises `SessionIsHot` when it is active, `ArchiveInProgress` when another archiver
        holds it, `ConcurrencyConflict` when it changed while being uploaded. `check` (an
        If-Match) sees the record under the fence, before anything is written.
        """
        started = time.perf_counter()
        token = await self._hot.fence(session_id, FENCE_TTL_S)
        if token is None:
            raise SessionIsHot(session_id)
        try:
            done = await self._archive_fenced(session_id, started + FENCE_BUDGET_S, check)
        except (ConcurrencyConflict, SessionNotFound, PreconditionFailed):
            raise  # not a failure: the session moved on or went away
        except Exception:
            self._metrics.archives.labels("error").inc()
            raise
        finally:
            await self._release(session_id, token)
        if done.by_us:
            self._metrics.archives.labels("ok").inc()
            self._metrics.archive_latency.observe(time.perf_counter() - started)
        return done

    async def _release(self, session_id: str, token: str) -> None:
        """Drop the fence; a failure is logged, never put over the archive's own outcome (the
        fence's TTL releases it in the end)."""
        try:
            await self._hot.unfence(session_id, token)
        except BackendUnavailable as exc:
            log.warning(
                "could not release the archive fence of session %s (%s); it expires by itself",
                session_id,
                exc,
                extra={"session_id": session_id},
            )

    async def _note_archived(self, session_id: str, version: int) -> None:
        """The feed's `archived` entry, after MongoDB's commit (no MULTI spans MongoDB). Best
        effort, like the fence's release: the archive stands either way, and a subscriber
        that misses the note finds the session archived when it next reads it."""
        try:
            await self._hot.note(session_id, version, "archived")
        except BackendUnavailable as exc:
            log.warning(
                "archived session %s, but its change feed could not say so (%s)",
                session_id,
                exc,
                extra={"session_id": session_id},
            )

    async def _archive_fenced(
        self, session_id: str, deadline: float, check: RecordCheck | None = None
    ) -> Archived:
        stored = await self._warm.stored(session_id)
        if stored is None:
            raise SessionNotFound(session_id)
        if check is not None:
            check(stored.record)
        if stored.archive is not None:
            if stored.purge_pending:  # an earlier archive stopped before its events delete
                kept = await self._fetch(session_id, stored.archive)
                await self._purge(session_id, stored.archive, kept)
                return Archived(stub=stored, by_us=True)
            return Archived(stub=stored, by_us=False)
        if parked := await self._hot.parked(session_id):
            raise OutboxEntriesParked(session_id, parked)
        archive = await self._warm.export(session_id)
        if archive is None:  # archived by a fence-less path meanwhile: not ours to redo
            raise ConcurrencyConflict(session_id, None)
        if check is not None:
            check(archive.record)
        _check_complete(archive)
        archive.record.state = SessionState.DORMANT
        body = pack(archive)
        key = archive_key(session_id, archive.record.created_at)
        _in_time(session_id, deadline)
        await self._cold.put(key, body)
        ref = ArchiveRef(key=key, sha256=sha256(body), size=len(body), archived_at=utcnow())
        await self._verify(session_id, ref)
        _in_time(session_id, deadline)
        if not await self._warm.to_stub(archive.record, ref):
            raise ConcurrencyConflict(session_id, None)
        log.info(
            "archived session %s (version %d, %d events, %d bytes) to %s",
            session_id,
            archive.record.version,
            len(archive.events),
            ref.size,
            key,
            extra={"session_id": session_id},
        )
        await self._purge(session_id, ref, archive)
        await self._note_archived(session_id, archive.record.version)
        stub = StoredSession(record=_stub_record(archive.record), archive=ref, cold_key=key)
        return Archived(stub=stub, by_us=True)

    async def _verify(self, session_id: str, ref: ArchiveRef) -> None:
        """S3 holds exactly what we sent: the size by HEAD, the bytes by GET and SHA-256."""
        size = await self._cold.size(ref.key)
        if size != ref.size:
            raise BackendUnavailable("s3", f"{ref.key} has {size} bytes, not {ref.size}")
        body = await self._cold.get(ref.key)
        if body is None or sha256(body) != ref.sha256:
            raise BackendUnavailable("s3", f"{ref.key} does not read back as written")

    async def _purge(self, session_id: str, ref: ArchiveRef, archive: SessionArchive) -> None:
        """Delete the events the stub no longer needs, unless the session came back meanwhile."""
        await self._warm.purge_events(session_id)
        now = await self._warm.stored(session_id)
        if now is not None and (now.archive is None or now.archive.sha256 != ref.sha256):
            # Restored while we deleted: its restore may have inserted before our delete.
            await self._warm.insert_events(session_id, archive.events)
            return
        await self._warm.purged(session_id, ref)

    # -- rehydrate ---------------------------------------------------------------------------

    async def rehydrate(self, session_id: str) -> SessionRecord:
        """Bring an archived session back to MongoDB as dormant; concurrent calls share one.

        The work runs as a task of its own, awaited by every caller: a caller that goes away
        does not stop a restore half-way for the others.
        """
        task = self._rehydrating.get(session_id)
        if task is None:
            task = asyncio.create_task(self._rehydrate(session_id), name=f"rehydrate-{session_id}")
            self._rehydrating[session_id] = task
            task.add_done_callback(lambda t: self._rehydrated(session_id, t))
        return await asyncio.shield(task)

    def _rehydrated(self, session_id: str, task: asyncio.Task[SessionRecord]) -> None:
        self._rehydrating.pop(session_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.debug("rehydration of %s failed: %r", session_id, task.exception())

    async def _rehydrate(self, session_id: str) -> SessionRecord:
        started = time.perf_counter()
        outcome = "error"
        try:
            record = await self._restore(session_id)
            outcome = "ok"
            return record
        finally:
            self._metrics.rehydrations.labels(outcome).inc()
            elapsed = time.perf_counter() - started
            self._metrics.rehydrate_latency.observe(elapsed)
            if outcome == "ok":
                self._metrics.session_retrieved("cold", elapsed)

    async def _restore(self, session_id: str) -> SessionRecord:
        started = time.monotonic()
        for _ in range(3):
            stored = await self._warm.stored(session_id)
            if stored is None:
                raise SessionNotFound(session_id)
            if stored.archive is None:
                return stored.record  # restored by someone else
            try:
                archive = await self._fetch(session_id, stored.archive)
            except ArchiveUnreadable:
                if await self._warm.stored(session_id) != stored:
                    continue  # re-archived or restored meanwhile: look again
                raise
            if archive.record.id != session_id or archive.record.version != stored.record.version:
                raise self._unreadable(session_id, stored.archive, "it holds another session")
            if await self._warm.restore(archive, stored.archive):
                log.info(
                    "rehydrated session %s (version %d, %d events) from %s",
                    session_id,
                    archive.record.version,
                    len(archive.events),
                    stored.archive.key,
                    extra={"session_id": session_id},
                )
                return archive.record
        # Archived again or restored under each try: a read has no version to be stale.
        raise WriteContended(session_id, 3, time.monotonic() - started, "rehydration")

    async def _fetch(self, session_id: str, ref: ArchiveRef) -> SessionArchive:
        body = await self._cold.get(ref.key)
        if body is None:
            raise self._unreadable(session_id, ref, f"s3://…/{ref.key} is missing")
        if len(body) != ref.size or sha256(body) != ref.sha256:
            raise self._unreadable(session_id, ref, f"{ref.key} fails its SHA-256 check")
        return unpack(session_id, body)

    @staticmethod
    def _unreadable(session_id: str, ref: ArchiveRef, reason: str) -> ArchiveUnreadable:
        log.error(
            "cannot rehydrate session %s: %s (the stub is left as it is)",
            session_id,
            reason,
            extra={"session_id": session_id, "key": ref.key},
        )
        return ArchiveUnreadable(session_id, reason)

    # -- delete and sweep --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def deleting(self, session_id: str) -> AsyncIterator[None]:
        """Delete the S3 copy of a session, then hold off archivers while the caller deletes
        the rest: an archive racing the delete could otherwise leave an orphan copy in S3."""
        token = await self._hot.fence(session_id, DELETE_FENCE_TTL_S)  # None: hot, no archiver
        try:
            stored = await self._warm.stored(session_id)
            if stored is not None and stored.cold_key:
                await self._cold.delete(stored.cold_key)
            yield
        finally:
            if token is not None:
                await self._release(session_id, token)

    async def candidates(self, older_than: timedelta, limit: int) -> list[str]:
        return await self._warm.archive_candidates(utcnow() - older_than, limit)


def _check_complete(archive: SessionArchive) -> None:
    """Refuse to archive a timeline with holes: its events are still on their way."""
    seqs = [e.seq for e in archive.events]
    if seqs != list(range(1, archive.record.timeline_seq + 1)):
        raise BackendUnavailable(
            "mongodb",
            f"session {archive.record.id} has {len(seqs)} of its "
            f"{archive.record.timeline_seq} events in MongoDB; retry once they are delivered",
        )


def _in_time(session_id: str, deadline: float) -> None:
    if time.perf_counter() > deadline:
        raise BackendUnavailable("s3", f"archiving {session_id} took too long; nothing changed")


def _stub_record(record: SessionRecord) -> SessionRecord:
    return msgspec.structs.replace(
        record,
        state=SessionState.ARCHIVED,
        participants={},
        work_in_progress={},
        context_summary={},
    )


class SweepResult(msgspec.Struct):
    selected: int = 0
    archived: int = 0
    skipped: int = 0
    failed: list[str] = msgspec.field(default_factory=list)


async def sweep(
    archivist: Archivist,
    older_than: timedelta,
    *,
    limit: int,
    dry_run: bool,
    report: Callable[[str], None],
) -> SweepResult:
    """Archive sessions at rest for longer than `older_than`, one line of progress each.

    Safe to run from several places at once: each session's fence lets one archiver in, and
    the others count it as skipped.
    """
    ids = await archivist.candidates(older_than, limit)
    result = SweepResult(selected=len(ids))
    report(f"{len(ids)} session(s) idle for more than {_span(older_than)} (limit {limit})")
    for n, session_id in enumerate(ids, start=1):
        step = f"[{n}/{len(ids)}]"
        if dry_run:
            report(f"{step} would archive {session_id}")
            continue
        try:
            done = await archivist.archive(session_id)
        except (SessionIsHot, ArchiveInProgress, ConcurrencyConflict, SessionNotFound) as exc:
            result.skipped += 1
            report(f"{step} skipped   {session_id}  ({_why_skipped(exc)})")
        except (BackendUnavailable, OutboxEntriesParked) as exc:
            result.failed.append(session_id)
            report(f"{step} FAILED    {session_id}  {exc}")
        else:
            stub, ref = done.stub, done.stub.archive
            if not done.by_us:
                result.skipped += 1
                report(f"{step} skipped   {session_id}  (archived already)")
                continue
            result.archived += 1
            size = f", {ref.size} bytes" if ref else ""
            report(f"{step} archived  {session_id}  (version {stub.record.version}{size})")
    return result


def _why_skipped(exc: Exception) -> str:
    if isinstance(exc, SessionIsHot):
        return "active in Redis"
    if isinstance(exc, ArchiveInProgress):
        return "another archiver has it"
    if isinstance(exc, SessionNotFound):
        return "deleted meanwhile"
    return "changed meanwhile; the next sweep takes it"


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

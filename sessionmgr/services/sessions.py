"""`SessionService`: every use case of a session, with the access check before any data use."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, TypeVar

import msgspec

from sessionmgr.domain import rules
from sessionmgr.domain.errors import (
    AccessDenied,
    ArchiveInProgress,
    BackendUnavailable,
    ConcurrencyConflict,
    InvalidInput,
    ParticipantNotFound,
    SessionNotFound,
)
from sessionmgr.domain.model import (
    ContextUpdate,
    NewEvent,
    Participant,
    Principal,
    Session,
    SessionRecord,
    SessionState,
    TimelineEvent,
    mad_principal,
    new_session_id,
    utcnow,
)
from sessionmgr.metrics import Metrics
from sessionmgr.services import quotas
from sessionmgr.services.archive import Archivist, SessionIsHot
from sessionmgr.services.ports import (
    CREATE_SCOPE,
    Change,
    HotStore,
    HotView,
    Idempotency,
    Undelivered,
    WarmStore,
)
from sessionmgr.services.timeline import DEFAULT_PAGE, TimelinePage, page_of
from sessionmgr.services.views import (
    AppendResult,
    LeaseInfo,
    SessionPage,
    summary,
    to_session,
)

R = TypeVar("R")
MAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
_encode = msgspec.json.Encoder().encode


class Limits(msgspec.Struct, frozen=True):
    recent_timeline: int = 20
    lease_ttl_s: int = 30
    max_field_bytes: int = 262_144
    max_events_per_append: int = 100
    page_size_default: int = 20
    page_size_max: int = 100
    max_sessions_per_owner: int = 1000
    max_participants: int = 64
    max_timeline_events: int = 100_000
    quota_privileged_factor: int = 10
    timeline_page_max: int = 500
    full_timeline_max: int = 1000


class SessionService:
    def __init__(
        self,
        hot: HotStore,
        warm: WarmStore,
        limits: Limits,
        archivist: Archivist | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._hot = hot
        self._warm = warm
        self._limits = limits
        self._archivist = archivist
        self._metrics = metrics or Metrics()

    # -- create and read -------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        owner_id: str | None = None,
        work_in_progress: dict[str, Any] | None = None,
        context_summary: dict[str, Any] | None = None,
        idem: Idempotency | None = None,
    ) -> Session:
        """MongoDB first, then Redis: a failure in between leaves a valid dormant session."""
        owner = owner_id or principal.sub
        if owner != principal.sub and not principal.may_act_for_others:
            raise AccessDenied("creating a session for another owner needs role admin or service")
        wip, ctx = work_in_progress or {}, context_summary or {}
        rules.check_value(wip, "work_in_progress", self._limits.max_field_bytes)
        rules.check_value(ctx, "context_summary", self._limits.max_field_bytes)
        if idem is not None and (replay := await self._hot.claim(CREATE_SCOPE, idem)):
            return msgspec.json.decode(replay.result, type=Session)
        try:
            await quotas.check_owner(self._limits, self._warm, principal, owner)
            return await self._create(owner, wip, ctx, idem)
        except BaseException:
            if idem is not None:
                with contextlib.suppress(BackendUnavailable):
                    await self._hot.release(CREATE_SCOPE, idem)
            raise

    async def _create(
        self,
        owner: str,
        wip: dict[str, Any],
        ctx: dict[str, Any],
        idem: Idempotency | None,
    ) -> Session:
        now = utcnow()
        record = SessionRecord(
            id=new_session_id(),
            version=1,
            state=SessionState.ACTIVE,
            owner_id=owner,
            acl=[],
            created_at=now,
            last_active=now,
            participants={},
            work_in_progress=wip,
            context_summary=ctx,
        )
        await self._warm.insert(record)
        session = to_session(record, [], {}, now)
        await self._hot.create(record, idem, _encode(session))
        return session

    async def get(self, principal: Principal, session_id: str, *, full: bool = False) -> Session:
        started = time.perf_counter()
        try:
            view = await self._hot.load(session_id)
        except BackendUnavailable:
            view = None  # read-only mode: MongoDB holds the latest delivered version
        if view is not None:
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            session = to_session(view.record, view.recent, view.lease_ttl_ms, utcnow())
            if full:
                await self._add_full(session, view.recent)
            self._retrieved("hot", started)
            return session
        record, rehydrated = await self._warm_record(principal, session_id)
        recent = await self._warm.recent_events(session_id, self._limits.recent_timeline)
        session = to_session(record, recent, {}, utcnow(), state=_resting(record.state))
        if full:
            await self._add_full(session, [])
        if not rehydrated:  # a rehydration counts itself as a cold retrieval
            self._retrieved("warm", started)
        return session

    def _retrieved(self, tier: str, started: float) -> None:
        self._metrics.session_retrieved(tier, time.perf_counter() - started)

    async def list_sessions(
        self,
        principal: Principal,
        *,
        state: SessionState | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        size = min(limit or self._limits.page_size_default, self._limits.page_size_max)
        if size < 1:
            raise InvalidInput("limit must be at least 1", "limit")
        after = _decode_cursor(cursor) if cursor else None
        sub = None if principal.is_admin else principal.sub
        page = await self._warm.list_for(sub, state, size, after)
        return SessionPage(
            items=[summary(r) for r in page.items],
            next_cursor=_encode_cursor(page.next_cursor) if page.next_cursor else None,
        )

    # -- mutations through the optimistic transaction ------------------------------------

    async def update(
        self,
        principal: Principal,
        session_id: str,
        *,
        expected_version: int,
        patch: dict[str, Any],
        idem: Idempotency | None = None,
    ) -> Session:
        rules.check_patch(patch, self._limits.max_field_bytes)

        def decide(view: HotView) -> Change:
            record = _check_version(view.record, expected_version)
            now = utcnow()
            small = {k: v for k, v in patch.items() if k != "full_context"}
            new = msgspec.structs.replace(
                record, version=record.version + 1, last_active=now, **small
            )
            context = (
                ContextUpdate(version=new.version, value=patch["full_context"])
                if "full_context" in patch
                else None
            )
            session = to_session(new, view.recent, view.lease_ttl_ms, now)
            fields = frozenset(small) | {"version", "last_active"}
            return Change(record=new, fields=fields, context=context, result=_encode(session))

        # Re-running after a WATCH abort re-checks expected_version, so a stale patch is a 409,
        # never applied; and a retry that raced its own original finds its first answer.
        return await self._mutate(principal, session_id, decide, idem, Session, "update")

    async def append(
        self,
        principal: Principal,
        session_id: str,
        events: list[NewEvent],
        *,
        expected_version: int | None = None,
        idem: Idempotency | None = None,
    ) -> AppendResult:
        self._check_events(events)

        def decide(view: HotView) -> Change:
            record = view.record
            if expected_version is not None:
                _check_version(record, expected_version)
            quotas.check_events(self._limits, principal, record, len(events))
            now, seq = utcnow(), record.timeline_seq
            stamped = [
                TimelineEvent(seq=seq + i, at=now, actor=principal.sub, kind=e.kind, data=e.data)
                for i, e in enumerate(events, start=1)
            ]
            new = msgspec.structs.replace(
                record, version=record.version + 1, timeline_seq=seq + len(events), last_active=now
            )
            result = AppendResult(
                version=new.version,
                appended=len(events),
                first_seq=seq + 1,
                last_seq=seq + len(events),
            )
            fields = frozenset({"version", "timeline_seq", "last_active"})
            return Change(record=new, fields=fields, events=stamped, result=_encode(result))

        # Re-running re-checks any expected_version; without one an append does not depend on
        # what it read.
        return await self._mutate(principal, session_id, decide, idem, AppendResult, "append")

    async def add_participant(
        self, principal: Principal, session_id: str, mad_name: str, idem: Idempotency | None = None
    ) -> Session:
        _check_mad(mad_name)
        ttl = timedelta(seconds=self._limits.lease_ttl_s)

        def decide(view: HotView) -> Change:
            record, now = view.record, utcnow()
            leases = {**view.lease_ttl_ms, mad_name: int(ttl.total_seconds() * 1000)}
            if mad_name in record.participants:
                session = to_session(record, view.recent, leases, now)
                return Change(
                    record=record,
                    fields=frozenset(),
                    leases_set=[mad_name],
                    result=_encode(session),
                )
            quotas.check_participants(self._limits, principal, record)
            participants = {
                **record.participants,
                mad_name: Participant(joined_at=now, lease_expires_at=now + ttl, active=True),
            }
            member = mad_principal(mad_name)
            acl = record.acl if member in record.acl else [*record.acl, member]
            new = msgspec.structs.replace(
                record,
                version=record.version + 1,
                last_active=now,
                participants=participants,
                acl=acl,
            )
            session = to_session(new, view.recent, leases, now)
            fields = frozenset({"version", "last_active", "participants", "acl"})
            return Change(record=new, fields=fields, leases_set=[mad_name], result=_encode(session))

        session = await self._mutate(principal, session_id, decide, idem, Session, "join")
        self._metrics.lease_operations.labels("join").inc()
        return session

    async def remove_participant(
        self, principal: Principal, session_id: str, mad_name: str, idem: Idempotency | None = None
    ) -> None:
        _check_mad(mad_name)

        def decide(view: HotView) -> Change:
            record = view.record
            if mad_name not in record.participants:
                return Change(record=record, fields=frozenset(), result=b"null")
            participants = {m: p for m, p in record.participants.items() if m != mad_name}
            acl = [a for a in record.acl if a != mad_principal(mad_name)]
            new = msgspec.structs.replace(
                record,
                version=record.version + 1,
                last_active=utcnow(),
                participants=participants,
                acl=acl,
            )
            fields = frozenset({"version", "last_active", "participants", "acl"})
            return Change(record=new, fields=fields, leases_dropped=[mad_name], result=b"null")

        await self._mutate(principal, session_id, decide, idem, type(None), "leave")
        self._metrics.lease_operations.labels("leave").inc()

    async def renew_lease(self, principal: Principal, session_id: str, mad_name: str) -> LeaseInfo:
        _check_mad(mad_name)
        # A participating MAD is in the ACL (`mad:<name>`), so the ordinary check admits it.
        view = await self._hot_view(principal, session_id)
        if mad_name not in view.record.participants:
            raise ParticipantNotFound(session_id, mad_name)
        ttl_ms = await self._hot.renew_lease(session_id, mad_name)
        self._metrics.lease_operations.labels("renew").inc()
        return LeaseInfo(mad_name=mad_name, expires_at=utcnow() + timedelta(milliseconds=ttl_ms))

    # -- moving between tiers ----------------------------------------------------------------

    async def suspend(
        self, principal: Principal, session_id: str, idem: Idempotency | None = None
    ) -> Session:
        return await self._once(
            principal, session_id, idem, Session, lambda: self._suspend(principal, session_id)
        )

    async def _suspend(self, principal: Principal, session_id: str) -> Session:
        access = await self._hot.access_fields(session_id)
        if access is not None:
            rules.require_access(principal, *access)
            record = await self._hot.suspend(session_id, self._warm.flush)
            if record is not None:
                recent = await self._warm.recent_events(session_id, self._limits.recent_timeline)
                return to_session(record, recent, {}, utcnow())
        return await self.get(principal, session_id)

    async def resume(
        self, principal: Principal, session_id: str, idem: Idempotency | None = None
    ) -> Session:
        async def run() -> Session:
            view = await self._hot_view(principal, session_id)
            return to_session(view.record, view.recent, view.lease_ttl_ms, utcnow())

        return await self._once(principal, session_id, idem, Session, run)

    async def delete(
        self, principal: Principal, session_id: str, idem: Idempotency | None = None
    ) -> None:
        """Tombstone first, so no replica can bring the session back while it is removed."""

        async def run() -> None:
            await self._authorize(principal, session_id, owner_only=True)
            cold = self._archivist.deleting(session_id) if self._archivist else nullcontext()
            async with cold:  # S3 first: no copy of its data outlives the session
                await self._hot.mark_deleted(session_id)
                await self._warm.delete(session_id)
            await self._hot.drop(session_id)

        await self._once(principal, session_id, idem, type(None), run, owner_only=True)

    async def archive(
        self, principal: Principal, session_id: str, idem: Idempotency | None = None
    ) -> Session:
        """Move a session's body to S3, leaving a stub in MongoDB; an active one is suspended."""

        async def run() -> Session:
            await self._authorize(principal, session_id, owner_only=True)
            for _ in range(3):
                try:
                    done = await self._cold().archive(session_id)
                except SessionIsHot:
                    await self._suspend(principal, session_id)
                    continue
                except ConcurrencyConflict:
                    continue  # it changed while we uploaded: take the new version
                session = to_session(done.stub.record, [], {}, utcnow())
                session.archive = done.stub.archive
                return session
            raise ConcurrencyConflict(session_id, None)

        return await self._once(principal, session_id, idem, Session, run, owner_only=True)

    # -- plumbing --------------------------------------------------------------------------

    async def _mutate(
        self,
        principal: Principal,
        session_id: str,
        decide: Callable[[HotView], Change],
        idem: Idempotency | None,
        result_type: type[R],
        operation: str,
    ) -> R:
        def guarded(view: HotView) -> Change:
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            return decide(view)

        try:
            for _ in range(3):
                outcome = await self._hot.transact(session_id, guarded, idem)
                if outcome is None:
                    await self._activate(principal, session_id)
                    continue
                return msgspec.json.decode(outcome.result, type=result_type)
        except ConcurrencyConflict:
            self._metrics.version_conflicts.labels(operation).inc()
            raise
        self._metrics.version_conflicts.labels(operation).inc()
        raise ConcurrencyConflict(session_id, None)

    async def _once(
        self,
        principal: Principal,
        session_id: str,
        idem: Idempotency | None,
        result_type: type[R],
        run: Callable[[], Any],
        *,
        owner_only: bool = False,
    ) -> R:
        """Run a naturally idempotent action, replaying its first answer for a repeated key.

        The caller's own earlier answer (the key is scoped to the caller) is replayed as is;
        a new key is written only after the access check, never for a stranger.
        """
        if idem is None:
            return await run()  # type: ignore[no-any-return]
        scope = session_id
        if replay := await self._hot.replay(scope, idem):
            return msgspec.json.decode(replay.result, type=result_type)
        await self._authorize(principal, session_id, owner_only=owner_only)
        if replay := await self._hot.claim(scope, idem):
            return msgspec.json.decode(replay.result, type=result_type)
        try:
            result = await run()
        except BaseException:
            with contextlib.suppress(BackendUnavailable):
                await self._hot.release(scope, idem)
            raise
        await self._hot.remember(scope, idem, _encode(result))
        return result  # type: ignore[no-any-return]

    async def _authorize(
        self, principal: Principal, session_id: str, *, owner_only: bool = False
    ) -> None:
        """Decide access from `owner_id` and `acl` alone, wherever the session lives now."""
        access = await self._hot.access_fields(session_id)
        if access is None:
            record = await self._warm.get(session_id)
            if record is None:
                raise SessionNotFound(session_id)
            access = (record.owner_id, record.acl)
        if owner_only:
            rules.require_owner(principal, access[0])
        else:
            rules.require_access(principal, *access)

    async def _hot_view(self, principal: Principal, session_id: str) -> HotView:
        for _ in range(3):
            view = await self._hot.load(session_id)
            if view is None:
                await self._activate(principal, session_id)
                continue
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            return view
        raise BackendUnavailable("redis", "the session could not be loaded into Redis")

    async def _activate(self, principal: Principal, session_id: str) -> None:
        """Load a dormant session back into Redis as `active` (after the access check)."""

        async def load() -> tuple[SessionRecord, list[TimelineEvent]]:
            record, _ = await self._warm_record(principal, session_id)
            record.state = SessionState.ACTIVE
            return record, await self._warm.recent_events(session_id, self._limits.recent_timeline)

        # An archived session comes back from S3 first (seconds, at worst), outside the WATCH:
        # a pooled Redis connection is then held only for a quick MongoDB read.
        await self._warm_record(principal, session_id)
        for wait_s in (0.05, 0.1, 0.2, 0.4, 0.8, None):
            try:
                loaded = await self._hot.activate(session_id, load)
                break
            except ArchiveInProgress:
                if wait_s is None:
                    raise
                await asyncio.sleep(wait_s)  # an archive holds it for a moment
        if loaded is not None:
            await self._warm.mark_state(session_id, loaded.version, SessionState.ACTIVE)

    async def _warm_record(
        self, principal: Principal, session_id: str
    ) -> tuple[SessionRecord, bool]:
        """The MongoDB record after the access check, and whether S3 had to give it back."""
        record = await self._warm.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        rules.require_access(principal, record.owner_id, record.acl)
        if record.state is SessionState.ARCHIVED:
            record = await self._cold().rehydrate(session_id)  # only after the access check
            return record, True
        return record, False

    def _cold(self) -> Archivist:
        if self._archivist is None:
            raise BackendUnavailable("s3", "no archive store is configured")
        return self._archivist

    async def _add_full(self, session: Session, hot_events: list[TimelineEvent]) -> None:
        """Fill `full_context` and `full_timeline` from MongoDB and the outbox's backlog.

        The outbox is read first: the worker writes MongoDB before it deletes an entry, so
        whatever left the outbox meanwhile is already in MongoDB when that is read next.
        """
        backlog = await self._undelivered(session.id)
        stored = await self._warm.context(session.id)
        cap = self._limits.full_timeline_max
        events = await self._warm.events_after(session.id, 0, cap + 1)
        newest = max(
            (c for c in (stored, backlog.context) if c is not None),
            key=lambda c: c.version,
            default=None,
        )
        session.full_context = newest.value if newest else {}
        page = page_of(events, [*backlog.events, *hot_events], 0, cap)
        session.full_timeline = page.items
        session.full_timeline_next_after_seq = page.next_after_seq

    async def _undelivered(self, session_id: str) -> Undelivered:
        try:
            return await self._hot.undelivered(session_id)
        except BackendUnavailable as exc:
            if exc.backend != "redis":
                raise
            return Undelivered(events=[], context=None)  # read-only: MongoDB is all there is

    async def timeline(
        self, principal: Principal, session_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> TimelinePage:
        """A page of the timeline after `after_seq`, from every tier that holds a part of it."""
        if after_seq < 0:
            raise InvalidInput("after_seq must be 0 or more", "after_seq")
        size = min(limit or DEFAULT_PAGE, self._limits.timeline_page_max)
        try:
            view = await self._hot.load(session_id)
        except BackendUnavailable:
            view = None  # read-only mode: MongoDB holds the latest delivered events
        if view is not None:
            rules.require_access(principal, view.record.owner_id, view.record.acl)
        else:
            await self._warm_record(principal, session_id)  # an archived one comes back
        backlog = await self._undelivered(session_id)  # first: see `_add_full`
        stored = await self._warm.events_after(session_id, after_seq, size + 1)
        recent = view.recent if view is not None else []
        return page_of(stored, [*backlog.events, *recent], after_seq, size)

    def _check_events(self, events: list[NewEvent]) -> None:
        if not events:
            raise InvalidInput("events must not be empty", "events")
        if len(events) > self._limits.max_events_per_append:
            raise InvalidInput(
                f"at most {self._limits.max_events_per_append} events per call", "events"
            )
        for i, event in enumerate(events):
            if not KIND.fullmatch(event.kind):
                raise InvalidInput(
                    "kind must be 1-64 characters of letters, digits and _.:/-", f"events[{i}].kind"
                )
            rules.check_value(event.data, f"events[{i}].data", self._limits.max_field_bytes)


def _check_version(record: SessionRecord, expected: int) -> SessionRecord:
    if record.version != expected:
        raise ConcurrencyConflict(record.id, record.version)
    return record


def _check_mad(mad_name: str) -> None:
    if not MAD_NAME.fullmatch(mad_name):
        raise InvalidInput(
            "mad_name must be 1-64 letters, digits or _.- and start with a letter or digit",
            "mad_name",
        )


def _resting(state: SessionState) -> SessionState:
    """A session read from MongoDB is not hot, whatever state its last write recorded."""
    return SessionState.DORMANT if state is SessionState.ACTIVE else state


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("cursor is not one this service handed out", "cursor") from None
    if not re.fullmatch(r"[0-9a-f]{32}", raw):
        raise InvalidInput("cursor is not one this service handed out", "cursor")
    return raw

"""`SessionService`: every use case of a session, with the access check before any data use."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, TypeVar

import msgspec

from sessionmgr.domain import leases, merge_patch, rules
from sessionmgr.domain.errors import (
    AccessDenied,
    ArchiveInProgress,
    BackendUnavailable,
    ConcurrencyConflict,
    IdempotencyKeyReused,
    InvalidInput,
    LeaseExpired,
    ParticipantNotFound,
    SessionDormant,
    SessionNotFound,
    WriteContended,
)
from sessionmgr.domain.model import (
    ContextUpdate,
    NewEvent,
    Principal,
    Session,
    SessionRecord,
    SessionState,
    TimelineEvent,
    new_session_id,
    new_write_id,
    utcnow,
)
from sessionmgr.domain.preconditions import Precondition, check
from sessionmgr.metrics import Metrics
from sessionmgr.services import cursors, quotas
from sessionmgr.services.archive import Archivist, SessionIsHot
from sessionmgr.services.divergence import Reconciler
from sessionmgr.services.ports import (
    CREATE_SCOPE,
    RECEIPT,
    Change,
    HotStore,
    HotView,
    Idempotency,
    Receipt,
    RecordCheck,
    Replayed,
    SessionRebased,
    Undelivered,
    WarmStore,
    WriteDiverged,
)
from sessionmgr.services.replays import mark_replayed
from sessionmgr.services.timeline import DEFAULT_PAGE, TimelinePage, page_of
from sessionmgr.services.views import (
    AppendResult,
    ArchivedSession,
    LeaseInfo,
    ListOrder,
    SessionPage,
    archived,
    summary,
    to_session,
)

R = TypeVar("R")
# No '.': a MAD name is a key of `participants`, and MongoDB reads a dotted key as a path.
MAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
_encode = msgspec.json.Encoder().encode


class Limits(msgspec.Struct, frozen=True):
    recent_timeline: int = 20
    lease_ttl_s: int = 30
    max_field_bytes: int = 262_144
    max_events_per_append: int = 100
    page_size_default: int = 20
    page_size_max: int = 100
    idempotency_max_answer_bytes: int = 16_384
    idempotency_max_keys_per_caller: int = 10_000
    lease_grace_s: int = 300
    participants_role: str | None = None

    max_sessions_per_owner: int = 1000
    max_participants: int = 64
    max_timeline_events: int = 100_000
    quota_privileged_factor: int = 10
    timeline_page_max: int = 500
    full_timeline_max: int = 1000
    quota_count_ttl_s: float = 1.0


# Checked before a decision, and on a session at rest before waking it: (record, live leases).
Permit = Callable[[SessionRecord, Mapping[str, int]], None]


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
        self._reconciler = Reconciler(hot, warm, self._metrics)
        self._owner_counts = quotas.OwnerCounts(limits.quota_count_ttl_s)

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
        """MongoDB first, then Redis: a failure in between leaves a valid dormant session.

        With an Idempotency-Key the session's id comes from the key (and the request), so a
        retry after any failure finds the session the first attempt may have stored and
        finishes it, instead of creating a second one.

        Why a create does not go through the outbox like every other write (issue 16, measured
        and decided; README "The write path"): the hash and an outbox entry in one MULTI would
        keep "no half session is ever visible", and `python -m bench.micro app --wire
        --without warm-insert` puts the MongoDB writes at about half of a create's CPU in the
        service. But DESIGN §2 promises that an acknowledged create exists in MongoDB (a Redis
        loss within AOF's second cannot take a session whose id the client holds), the owner
        quota is counted in MongoDB (sessions still in the outbox would not count), and on the
        benchmark's warm tier the write-behind drains far fewer entries a second than the
        API takes creates (docs/benchmarks.md: the outbox backlog after each write scenario),
        so such a create rate would only be a growing backlog. What changed instead: the
        quota count is reused and made once at a time per owner (`quotas.OwnerCounts`), and
        the write-id ledger gets no entry for version 1, which the document names
        (`MongoWarmStore.insert`): one MongoDB write per create.
        """
        owner = owner_id or principal.sub
        if owner != principal.sub and not principal.may_act_for_others:
            raise AccessDenied("creating a session for another owner needs role admin or service")
        wip, ctx = work_in_progress or {}, context_summary or {}
        rules.check_value(wip, "work_in_progress", self._limits.max_field_bytes)
        rules.check_value(ctx, "context_summary", self._limits.max_field_bytes)
        if idem is None:
            await quotas.check_owner(
                self._limits, self._warm, principal, owner, counts=self._owner_counts
            )
            return await self._create(new_session_id(), owner, wip, ctx, None)
        await self._hot.admit_key(idem, self._limits.idempotency_max_keys_per_caller)
        if replay := await self._claim(CREATE_SCOPE, idem):
            return await self._replayed(principal, replay, Session)
        session_id = keyed_session_id(idem)
        try:
            await self._refuse_deleted(session_id)
            await quotas.check_owner(self._limits, self._warm, principal, owner, session_id)
            return await self._create(session_id, owner, wip, ctx, idem)
        except BaseException:
            await self._release(CREATE_SCOPE, idem)
            raise

    async def _create(
        self,
        session_id: str,
        owner: str,
        wip: dict[str, Any],
        ctx: dict[str, Any],
        idem: Idempotency | None,
    ) -> Session:
        now = utcnow()
        record = SessionRecord(
            id=session_id,
            version=1,
            state=SessionState.ACTIVE,
            owner_id=owner,
            acl=[],
            created_at=now,
            last_active=now,
            participants={},
            work_in_progress=wip,
            context_summary=ctx,
            write_id=new_write_id(),
        )
        if not await self._warm.insert(record):
            return await self._finish_create(session_id, owner, idem)
        session = to_session(record, [], {}, now)
        # The answer is kept for a key only: an unkeyed create need not encode it twice.
        kept = self._keepable(_encode(session), record) if idem is not None else b""
        await self._hot.create(record, idem, kept)
        return session

    async def _refuse_deleted(self, session_id: str) -> None:
        """The key's session was created and deleted since: the key is spent."""
        if await self._hot.is_deleted(session_id):
            raise IdempotencyKeyReused("this Idempotency-Key created a session since deleted")

    async def _finish_create(
        self, session_id: str, owner: str, idem: Idempotency | None
    ) -> Session:
        """An earlier attempt with this key stored the session and failed after: make it
        active (once) and answer it as it is, then keep that answer for the key."""
        if idem is None:  # a random 128-bit id met another: never in practice
            raise BackendUnavailable("mongodb", "session id collision; retry", retryable=True)
        creator = Principal(sub=owner, roles=frozenset({"admin"}))
        view = await self._hot_view(creator, session_id)
        if view.record.owner_id != owner:
            raise IdempotencyKeyReused()
        session = to_session(view.record, view.recent, view.lease_ttl_ms, utcnow())
        await self._hot.remember(CREATE_SCOPE, idem, self._keepable(_encode(session), view.record))
        return session

    async def get(self, principal: Principal, session_id: str, *, full: bool = False) -> Session:
        started = time.perf_counter()
        try:
            view = await self._hot.load(session_id)
        except BackendUnavailable:
            view = None  # read-only mode: MongoDB holds the latest delivered version
        if view is not None:
            view = self._reaped(view, utcnow())[0]
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            session = to_session(view.record, view.recent, view.lease_ttl_ms, utcnow())
            if full:
                await self._add_full(session, view.recent)
            self._retrieved("hot", started)
            return session
        record, rehydrated = await self._warm_record(principal, session_id)
        record = self._at_rest(record)
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
        order: ListOrder = ListOrder.ID,
    ) -> SessionPage:
        size = min(limit or self._limits.page_size_default, self._limits.page_size_max)
        if size < 1:
            raise InvalidInput("limit must be at least 1", "limit")
        after = cursors.decode(cursor, order) if cursor else None
        sub = None if principal.is_admin else principal.sub
        page = await self._warm.list_for(sub, state, size, after, order=order)
        last = page.items[-1] if page.items and page.next_cursor else None
        return SessionPage(
            items=[summary(r) for r in page.items],
            next_cursor=cursors.encode(last, order) if last else None,
        )

    # -- mutations through the optimistic transaction ------------------------------------

    async def update(
        self,
        principal: Principal,
        session_id: str,
        *,
        expected_version: int | None,
        patch: dict[str, Any],
        idem: Idempotency | None = None,
        lease_token: int | None = None,
        if_match: Precondition | None = None,
    ) -> Session:
        """Replace each top-level field the patch names: 409 when `expected_version` is stale,
        412 when `if_match` names another version."""
        rules.check_patch(patch, self._limits.max_field_bytes)
        return await self._write_fields(
            principal, session_id, expected_version, lambda _: patch, idem, lease_token, if_match
        )

    async def merge_update(
        self,
        principal: Principal,
        session_id: str,
        *,
        expected_version: int | None,
        document: Any,
        idem: Idempotency | None = None,
        lease_token: int | None = None,
        if_match: Precondition | None = None,
    ) -> Session:
        """JSON Merge Patch (RFC 7396): nested keys change without a read-modify-write."""
        changes = merge_patch.check_document(document)
        rules.check_value(changes, "body", self._limits.max_field_bytes)

        def merged(record: SessionRecord) -> dict[str, Any]:
            fields = {n: merge_patch.merge(getattr(record, n), c) for n, c in changes.items()}
            for name, value in fields.items():
                rules.check_value(value, name, self._limits.max_field_bytes)
            return fields

        return await self._write_fields(
            principal, session_id, expected_version, merged, idem, lease_token, if_match
        )

    async def _write_fields(
        self,
        principal: Principal,
        session_id: str,
        expected_version: int | None,
        compute: Callable[[SessionRecord], dict[str, Any]],
        idem: Idempotency | None,
        lease_token: int | None,
        if_match: Precondition | None = None,
    ) -> Session:
        def decide(view: HotView) -> Change:
            record = view.record
            if expected_version is not None:
                _check_version(record, expected_version)
            patch = compute(record)
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

        # Re-running after a refused commit re-checks expected_version, so a stale patch is a
        # 409, never applied; and a retry that raced its own original finds its first answer.
        return await self._mutate(
            principal,
            session_id,
            decide,
            idem,
            Session,
            "update",
            permit=self._lease_holder(principal, lease_token),
            if_match=if_match,
            expects_version=expected_version is not None,
        )

    async def append(
        self,
        principal: Principal,
        session_id: str,
        events: list[NewEvent],
        *,
        expected_version: int | None = None,
        idem: Idempotency | None = None,
        lease_token: int | None = None,
        if_match: Precondition | None = None,
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
        return await self._mutate(
            principal,
            session_id,
            decide,
            idem,
            AppendResult,
            "append",
            permit=self._lease_holder(principal, lease_token),
            if_match=if_match,
            expects_version=expected_version is not None,
        )

    async def add_participant(
        self,
        principal: Principal,
        session_id: str,
        mad_name: str,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> Session:
        """Grant a lease (a new fencing token) to a new or lapsed participant; renew a live one.

        Adding another MAD is for those who manage participants; a MAD may rejoin itself while
        it is still a participant. A dormant session is not woken for it (409 `dormant`).
        """
        _check_mad(mad_name)
        ttl = timedelta(seconds=self._limits.lease_ttl_s)
        ttl_ms = self._limits.lease_ttl_s * 1000
        role = self._limits.participants_role

        def permit(record: SessionRecord, live: Mapping[str, int]) -> None:
            if leases.mad_of(principal) == mad_name and mad_name in record.participants:
                return  # a rejoin
            leases.require_manager(principal, record.owner_id, role, "add other participants")

        def decide(view: HotView) -> Change:
            record, now = view.record, utcnow()
            live = {**view.lease_ttl_ms, mad_name: ttl_ms}
            if mad_name in record.participants and mad_name in view.lease_ttl_ms:
                renewal = leases.renewed(record, mad_name, now, ttl)
                session = to_session(renewal, view.recent, live, now)
                return _renewal(renewal, mad_name, _encode(session))
            if mad_name not in record.participants:
                quotas.check_participants(self._limits, principal, record)
            granted, _ = leases.granted(record, mad_name, now, ttl)
            new = msgspec.structs.replace(granted, version=record.version + 1, last_active=now)
            session = to_session(new, view.recent, live, now)
            fields = frozenset({"version", "last_active", "participants", "acl", "lease_grants"})
            return Change(record=new, fields=fields, leases_set=[mad_name], result=_encode(session))

        session = await self._mutate(
            principal,
            session_id,
            decide,
            idem,
            Session,
            "join",
            permit=permit,
            wake=False,
            if_match=if_match,
        )
        self._metrics.lease_operations.labels("join").inc()
        return session

    async def remove_participant(
        self,
        principal: Principal,
        session_id: str,
        mad_name: str,
        idem: Idempotency | None = None,
        lease_token: int | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> None:
        """Remove a MAD from `participants` and the ACL at once; a MAD may remove itself."""
        _check_mad(mad_name)

        def permit(record: SessionRecord, live: Mapping[str, int]) -> None:
            what = "remove other participants"
            leases.require_self_or_manager(principal, record, mad_name, self._role, what)
            if leases.mad_of(principal) == mad_name and mad_name in record.participants:
                leases.check_token(session_id, mad_name, record.participants[mad_name], lease_token)

        def decide(view: HotView) -> Change:
            record = view.record
            if mad_name not in record.participants:
                raise ParticipantNotFound(session_id, mad_name)
            new = msgspec.structs.replace(
                leases.without(record, [mad_name]),
                version=record.version + 1,
                last_active=utcnow(),
            )
            fields = frozenset({"version", "last_active", "participants", "acl"})
            return Change(record=new, fields=fields, leases_dropped=[mad_name], result=b"null")

        await self._mutate(
            principal,
            session_id,
            decide,
            idem,
            type(None),
            "leave",
            permit=permit,
            if_match=if_match,
        )
        self._metrics.lease_operations.labels("leave").inc()

    async def renew_lease(
        self,
        principal: Principal,
        session_id: str,
        mad_name: str,
        lease_token: int | None = None,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> LeaseInfo:
        """Extend a live lease, keeping its token; a lapsed one is rejoined, never renewed."""
        _check_mad(mad_name)
        ttl = timedelta(seconds=self._limits.lease_ttl_s)

        def permit(record: SessionRecord, live: Mapping[str, int]) -> None:
            what = "renew another participant's lease"
            leases.require_self_or_manager(principal, record, mad_name, self._role, what)

        def decide(view: HotView) -> Change:
            record, now = view.record, utcnow()
            participant = record.participants.get(mad_name)
            if participant is None:
                raise ParticipantNotFound(session_id, mad_name)
            if mad_name not in view.lease_ttl_ms:
                raise LeaseExpired(session_id, mad_name)
            if leases.mad_of(principal) == mad_name:
                leases.check_token(session_id, mad_name, participant, lease_token)
            info = LeaseInfo(mad_name=mad_name, expires_at=now + ttl, token=participant.token)
            return _renewal(leases.renewed(record, mad_name, now, ttl), mad_name, _encode(info))

        info = await self._mutate(
            principal,
            session_id,
            decide,
            idem,
            LeaseInfo,
            "renew",
            permit=permit,
            wake=False,
            if_match=if_match,
        )
        self._metrics.lease_operations.labels("renew").inc()
        return info

    @property
    def _role(self) -> str | None:
        return self._limits.participants_role

    def _lease_holder(self, principal: Principal, lease_token: int | None) -> Permit:
        """A data write by a MAD needs its live lease (and, when sent, its newest token)."""

        def permit(record: SessionRecord, live: Mapping[str, int]) -> None:
            leases.require_live_lease(principal, record, live, lease_token)

        return permit

    def _reaped(self, view: HotView, now: datetime) -> tuple[HotView, list[str]]:
        """The view without participants whose lease lapsed more than the grace period ago."""
        grace = timedelta(seconds=self._limits.lease_grace_s)
        gone = leases.reapable(view.record, view.lease_ttl_ms, now, grace)
        if not gone:
            return view, gone
        record = leases.without(view.record, gone)
        return view.with_record(record), gone

    def _at_rest(self, record: SessionRecord) -> SessionRecord:
        """A record read from MongoDB as its readers see it: lapsed participants reaped.

        Not while it is `active` (Redis is down and MongoDB lags on lease renewals)."""
        if record.state is SessionState.ACTIVE:
            return record
        grace = timedelta(seconds=self._limits.lease_grace_s)
        return leases.without(record, leases.reapable(record, {}, utcnow(), grace))

    # -- moving between tiers ----------------------------------------------------------------

    async def suspend(
        self,
        principal: Principal,
        session_id: str,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> Session:
        return await self._once(
            principal,
            session_id,
            idem,
            Session,
            lambda: self._suspend(principal, session_id, if_match),
        )

    async def _suspend(
        self, principal: Principal, session_id: str, if_match: Precondition | None = None
    ) -> Session:
        """Owner, admin or the participants role: a suspend ends every MAD's lease."""
        what = "suspend this session"
        access = await self._hot.access_fields(session_id)
        if access is not None:
            rules.require_access(principal, *access)
            leases.require_manager(principal, access[0], self._role, what)
            record = await self._hot.suspend(
                session_id, self._flush_at_rest, _record_check(if_match, session_id)
            )
            if record is not None:
                recent = await self._warm.recent_events(session_id, self._limits.recent_timeline)
                return to_session(record, recent, {}, utcnow())
        if if_match is not None:  # at rest already: nothing to write, but the answer is a 412
            await self._check_current(principal, session_id, if_match)
        session = await self.get(principal, session_id)
        leases.require_manager(principal, session.owner_id, self._role, what)
        return session

    async def suspend_unattended(self, session_id: str, check: RecordCheck) -> SessionRecord | None:
        """Suspend on the service's own behalf (the idle sweep, services/idle.py): no caller
        to authorize, the same flush and divergence handling as `suspend`. `check` sees the
        record under the WATCH and raises to leave the session hot."""
        return await self._hot.suspend(session_id, self._flush_at_rest, check)

    async def _flush_at_rest(
        self, record: SessionRecord, events: list[TimelineEvent], context: ContextUpdate | None
    ) -> bool:
        """Suspend's flush: the lease keys go with the hot keys, so every lease ends now.

        A write that diverges from MongoDB (Redis lost writes) is kept and the hot session
        re-based; the suspend then reads the session again and starts over."""
        record.participants = leases.ended(record.participants, utcnow())
        try:
            return await self._warm.flush(record, events, context)
        except WriteDiverged as diverged:
            if await self._reconciler.settle(diverged):
                raise SessionRebased(record.id) from None
            return True

    async def resume(
        self,
        principal: Principal,
        session_id: str,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> Session:
        async def run() -> Session:
            if if_match is not None:
                await self._check_current(principal, session_id, if_match)
            view = await self._hot_view(principal, session_id)
            return to_session(view.record, view.recent, view.lease_ttl_ms, utcnow())

        return await self._once(principal, session_id, idem, Session, run)

    async def delete(
        self,
        principal: Principal,
        session_id: str,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> None:
        """Tombstone first, so no replica can bring the session back while it is removed."""

        async def run() -> None:
            await self._authorize(principal, session_id, owner_only=True)
            if if_match is not None:
                await self._check_current(principal, session_id, if_match)
            cold = self._archivist.deleting(session_id) if self._archivist else nullcontext()
            async with cold:  # S3 first: no copy of its data outlives the session
                await self._hot.mark_deleted(session_id)
                await self._warm.delete(session_id)
            await self._hot.drop(session_id)

        try:
            await self._once(principal, session_id, idem, type(None), run, owner_only=True)
        except SessionNotFound:
            # A keyed retry of a delete whose answer was lost: the tombstone says it went
            # through. Finish its clean-up (dropping is idempotent) and answer as it would have.
            if idem is None or not await self._hot.is_deleted(session_id):
                raise
            await self._hot.drop(session_id)
            mark_replayed()

    async def archive(
        self,
        principal: Principal,
        session_id: str,
        idem: Idempotency | None = None,
        *,
        if_match: Precondition | None = None,
    ) -> ArchivedSession:
        """Move a session's body to S3, leaving a stub in MongoDB; an active one is suspended."""
        verify = _record_check(if_match, session_id)

        async def run() -> ArchivedSession:
            await self._authorize(principal, session_id, owner_only=True)
            started = time.monotonic()
            for _ in range(3):
                try:
                    done = await self._cold().archive(session_id, verify)
                except SessionIsHot:
                    await self._suspend(principal, session_id, if_match)
                    continue
                except ConcurrencyConflict:
                    continue  # it changed while we uploaded: take the new version
                if done.stub.archive is None:  # a stub always has its reference
                    raise ConcurrencyConflict(session_id, None)
                return archived(done.stub.record, done.stub.archive)
            # Written (or woken) again under each upload: nothing archived, no version stale.
            raise WriteContended(session_id, 3, time.monotonic() - started, "archive")

        return await self._once(principal, session_id, idem, ArchivedSession, run, owner_only=True)

    # -- plumbing --------------------------------------------------------------------------

    async def _mutate(
        self,
        principal: Principal,
        session_id: str,
        decide: Callable[[HotView], Change],
        idem: Idempotency | None,
        result_type: type[R],
        operation: str,
        *,
        permit: Permit | None = None,
        wake: bool = True,
        if_match: Precondition | None = None,
        expects_version: bool = False,
    ) -> R:
        """Run `decide` in the hot transaction after the access check, `permit` and `if_match`.
        `expects_version`: `decide` checks an `expected_version` (see `HotStore.transact`).

        Lapsed participants past their grace period are reaped first; a versioned change
        writes that too. A dormant session is loaded into Redis unless `wake` is False (then
        409 `dormant`); a call that `permit` refuses never wakes it.
        """

        def guarded(view: HotView) -> Change:
            view, gone = self._reaped(view, utcnow())
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            check(if_match, session_id, view.record.version)  # the commit is conditional on it
            if permit is not None:
                permit(view.record, view.lease_ttl_ms)
            change = decide(view)
            if gone and change.fields:
                change.fields = change.fields | {"participants", "acl"}
            if idem is not None:
                change.stored = self._keepable(change.result, change.record)
            return change

        if idem is not None:
            await self._hot.admit_key(idem, self._limits.idempotency_max_keys_per_caller)
        started = time.monotonic()
        try:
            for _ in range(3):
                outcome = await self._hot.transact(
                    session_id,
                    guarded,
                    idem,
                    names_version=expects_version or if_match is not None,
                )
                if outcome is None:
                    if if_match is not None:  # a 412 must not wake a dormant session
                        await self._check_current(principal, session_id, if_match)
                    if permit is not None or not wake:
                        await self._check_at_rest(principal, session_id, permit)
                    if not wake:
                        raise SessionDormant(session_id)
                    await self._activate(principal, session_id)
                    continue
                if isinstance(outcome, Replayed):
                    await self._authorize(principal, session_id)  # a removed caller gets 403
                    return await self._replayed(principal, outcome, result_type)
                return msgspec.json.decode(outcome.result, type=result_type)
        except WriteContended:
            raise  # no version was stale: beaten by other writers, nothing written
        except ConcurrencyConflict:
            self._metrics.version_conflicts.labels(operation).inc()
            raise
        # Woken three times and suspended again each time before the write could land: it did
        # not take effect, and no version it named was stale.
        raise WriteContended(session_id, 3, time.monotonic() - started, operation)

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

        Access is checked first, replay or not: a caller removed from the session since its
        first call gets a 403, not its old answer. A key is written only after that check.
        """
        if idem is None:
            return await run()  # type: ignore[no-any-return]
        scope = session_id
        try:
            await self._authorize(principal, session_id, owner_only=owner_only)
        except SessionNotFound:
            # Gone: nothing left to protect. A repeated delete answers as the first one did.
            if replay := await self._hot.replay(scope, idem):
                return await self._replayed(principal, replay, result_type)
            raise
        await self._hot.admit_key(idem, self._limits.idempotency_max_keys_per_caller)
        if replay := await self._claim(scope, idem):
            return await self._replayed(principal, replay, result_type)
        try:
            result = await run()
            encoded = _encode(result)
            # Only a session can be large; the other answers (nothing, a lease) are tiny.
            kept = self._keepable(encoded, result) if isinstance(result, Session) else encoded
            # Not remembered: the claim goes back and a retry runs the action again, which
            # is harmless for these actions (they are idempotent by nature).
            await self._hot.remember(scope, idem, kept)
        except BaseException:
            await self._release(scope, idem)
            raise
        return result  # type: ignore[no-any-return]

    async def _claim(self, scope: str, idem: Idempotency) -> Replayed | None:
        """Claim the key; if the answer was lost the claim may be ours: give it back, so the
        client's retry is not told "in flight" until the claim lapses."""
        try:
            return await self._hot.claim(scope, idem)
        except BackendUnavailable:
            await self._release(scope, idem)
            raise

    async def _release(self, scope: str, idem: Idempotency) -> None:
        """Best effort (the claim lapses by itself); only this attempt's own claim."""
        with contextlib.suppress(BackendUnavailable):
            await self._hot.release(scope, idem)

    def _keepable(self, answer: bytes, session: SessionRecord | Session) -> bytes:
        """The answer itself when small; a receipt (id, version) when it is not, so that one
        keyed request on a large session never stores megabytes for a day."""
        if len(answer) <= self._limits.idempotency_max_answer_bytes:
            return answer
        return RECEIPT + _encode(Receipt(id=session.id, version=session.version))

    async def _replayed(self, principal: Principal, replay: Replayed, result_type: type[R]) -> R:
        """The first answer again, marked as a replay; a receipt answers the session now."""
        mark_replayed()
        receipt = replay.receipt
        if receipt is None:
            return msgspec.json.decode(replay.result, type=result_type)
        return await self.get(principal, receipt.id)  # type: ignore[return-value]

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

    async def _check_at_rest(
        self, principal: Principal, session_id: str, permit: Permit | None
    ) -> None:
        """What `guarded` checks, on the MongoDB record: no lease is alive at rest."""
        stored = await self._warm.get(session_id)
        if stored is None:
            raise SessionNotFound(session_id)
        record = self._at_rest(stored)
        rules.require_access(principal, record.owner_id, record.acl)
        if permit is not None:
            permit(record, {})

    async def _check_current(
        self, principal: Principal, session_id: str, if_match: Precondition
    ) -> None:
        """Check `if_match` against wherever the session lives now, touching nothing: an
        archived one is judged by its stub, a dormant one is not loaded into Redis."""
        view = await self._hot.load(session_id)
        if view is not None:
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            if_match.check(session_id, view.record.version)
            return
        record = await self._warm.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        rules.require_access(principal, record.owner_id, record.acl)
        if_match.check(session_id, record.version)

    async def _hot_view(self, principal: Principal, session_id: str) -> HotView:
        for _ in range(3):
            view = await self._hot.load(session_id)
            if view is None:
                await self._activate(principal, session_id)
                continue
            view = self._reaped(view, utcnow())[0]
            rules.require_access(principal, view.record.owner_id, view.record.acl)
            return view
        raise BackendUnavailable("redis", "the session could not be loaded into Redis")

    async def _activate(self, principal: Principal, session_id: str) -> None:
        """Load a dormant session back into Redis as `active` (after the access check)."""

        async def load() -> tuple[SessionRecord, list[TimelineEvent]]:
            record, _ = await self._warm_record(principal, session_id)
            record.state = SessionState.ACTIVE
            # Recorded before the hash exists (the WATCH is set and the hash absent): a suspend
            # needs the hash, so its "dormant" can only come after this "active", never before.
            await self._warm.mark_state(session_id, record.version, SessionState.ACTIVE)
            return record, await self._warm.recent_events(session_id, self._limits.recent_timeline)

        # An archived session comes back from S3 first (seconds, at worst), outside the WATCH:
        # a pooled Redis connection is then held only for a quick MongoDB read.
        await self._warm_record(principal, session_id)
        for wait_s in (0.05, 0.1, 0.2, 0.4, 0.8, None):
            try:
                await self._hot.activate(session_id, load)
                return
            except ArchiveInProgress:
                if wait_s is None:
                    raise
                await asyncio.sleep(wait_s)  # an archive holds it for a moment

    async def _warm_record(
        self, principal: Principal, session_id: str
    ) -> tuple[SessionRecord, bool]:
        """The MongoDB record after the access check, and whether S3 had to give it back."""
        record = await self._warm.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        rules.require_access(principal, record.owner_id, self._at_rest(record).acl)
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
        raise ConcurrencyConflict(record.id, record.version, behind=expected < record.version)
    return record


def _record_check(
    if_match: Precondition | None, session_id: str
) -> Callable[[SessionRecord], None] | None:
    """`if_match` as a check on a record a store reads inside its own transaction."""
    if if_match is None:
        return None
    return lambda record: if_match.check(session_id, record.version)


def _check_mad(mad_name: str) -> None:
    if not MAD_NAME.fullmatch(mad_name):
        raise InvalidInput(
            "mad_name must be 1-64 letters, digits, '_' or '-' and start with a letter or digit",
            "mad_name",
        )


def _renewal(record: SessionRecord, mad_name: str, result: bytes) -> Change:
    """A live lease extended: the same version and token, the new expiry kept in Redis only."""
    return Change(
        record=record,
        fields=frozenset({"participants"}),
        leases_set=[mad_name],
        result=result,
        hot_only=True,
    )


def _resting(state: SessionState) -> SessionState:
    """A session read from MongoDB is not hot, whatever state its last write recorded."""
    return SessionState.DORMANT if state is SessionState.ACTIVE else state


def keyed_session_id(idem: Idempotency) -> str:
    """The id a keyed create gives its session: the same for every retry of one request
    (caller, key and body), unguessable without all three, and never that of another
    request's session."""
    digest = hashlib.sha256(b"sessionmgr create\x00" + idem.key_digest.encode())
    digest.update(b"\x00" + idem.fingerprint.encode())
    return digest.hexdigest()[:32]

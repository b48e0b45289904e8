"""Small hand-written fakes of the ports for unit tests.

`InMemoryWarmStore` has the contract of `MongoWarmStore`: version-guarded writes (`apply` needs
a newer version, `flush` the same or newer), events keyed by `(session_id, seq)` so a replay
keeps the first copy, pages ordered by id.

`InMemoryHotStore` has the contract of `RedisHotStore`. It keeps each session as the hash the
real store writes (`encode_record` per field, so a `Change` writes only its `fields`), trims
the timeline, honours idempotency records and the delete tombstone, and plays WATCH: every
write to a session's keys bumps its revision, and a transaction or suspend that sees the
revision move between its read and its commit aborts like an EXEC after a fired WATCH.
`RedisHotStore` itself reads through a Lua script (EVALSHA), which fakeredis runs only with the
optional `lupa` package, so the real adapter is left to the integration suite on redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from sessionmgr.domain.errors import (
    BackendUnavailable,
    ConcurrencyConflict,
    SessionNotFound,
    TooManyIdempotencyKeys,
)
from sessionmgr.domain.model import ContextUpdate, SessionRecord, SessionState, TimelineEvent
from sessionmgr.services.ports import (
    Change,
    Decide,
    Flush,
    HotView,
    Idempotency,
    ListAfter,
    Loader,
    Page,
    RecordCheck,
    Replayed,
    Undelivered,
)
from sessionmgr.services.sessions import Limits, SessionService
from sessionmgr.storage.hot import (
    OutboxEntry,
    decode_record,
    encode_record,
    idem_value,
    pending_value,
    replay_of,
)

_record_json = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(SessionRecord).decode


def _copy(record: SessionRecord) -> SessionRecord:
    """A deep copy, as MongoDB hands back a new document on every read."""
    return _decode_record(_record_json(record))


@dataclass
class InMemoryWarmStore:
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    events: dict[str, dict[int, TimelineEvent]] = field(default_factory=dict)
    contexts: dict[str, ContextUpdate] = field(default_factory=dict)
    down: bool = False
    """While True every call raises `BackendUnavailable("mongodb")`, as `MongoWarmStore` does."""
    apply_errors: dict[str, Exception] = field(default_factory=dict)
    """Session id → what `apply` raises for it: a failure other than an outage."""
    applied: list[tuple[str, int]] = field(default_factory=list)
    """(session id, version) of every record `apply` stored, in order."""

    def _reachable(self) -> None:
        if self.down:
            raise BackendUnavailable("mongodb", "ServerSelectionTimeoutError")

    async def ping(self) -> None:
        self._reachable()

    async def insert(self, record: SessionRecord) -> bool:
        self._reachable()
        if record.id in self.sessions:
            return False
        self.sessions[record.id] = _copy(record)
        self.contexts[record.id] = ContextUpdate(version=0, value={})
        return True

    async def context(self, session_id: str) -> ContextUpdate | None:
        self._reachable()
        return self.contexts.get(session_id) if session_id in self.sessions else None

    async def get(self, session_id: str) -> SessionRecord | None:
        self._reachable()
        record = self.sessions.get(session_id)
        return None if record is None else _copy(record)

    async def recent_events(self, session_id: str, limit: int) -> list[TimelineEvent]:
        self._reachable()
        return (await self.all_events(session_id))[-limit:]

    async def all_events(self, session_id: str) -> list[TimelineEvent]:
        self._reachable()
        stored = self.events.get(session_id, {})
        return [stored[seq] for seq in sorted(stored)]

    async def events_after(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[TimelineEvent]:
        return [e for e in await self.all_events(session_id) if e.seq > after_seq][:limit]

    async def apply(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        self._reachable()
        if record.id in self.apply_errors:
            raise self.apply_errors[record.id]
        written = self._write(record, events, context, newer_only=True)
        if written:
            self.applied.append((record.id, record.version))
        return written

    async def apply_many(self, entries: Sequence[OutboxEntry]) -> list[int]:
        """One `apply` each, in order (the effect the port asks for); it leaves nothing to
        `apply`, since it has done just that. An error stops it, as MongoDB's may."""
        for entry in entries:
            await self.apply(entry.record, entry.events, entry.context)
        return []

    async def flush(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        self._reachable()
        return self._write(record, events, context, newer_only=False)

    def _write(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None,
        *,
        newer_only: bool,
    ) -> bool:
        current = self.sessions.get(record.id)
        if current is None:
            return False
        newer = record.version > current.version
        if newer or (not newer_only and record.version == current.version):
            self.sessions[record.id] = _copy(record)
        if context is not None and context.version > self.contexts[record.id].version:
            self.contexts[record.id] = context
        stored = self.events.setdefault(record.id, {})
        for event in events:
            stored.setdefault(event.seq, event)
        return True

    async def mark_state(self, session_id: str, version: int, state: SessionState) -> None:
        self._reachable()
        current = self.sessions.get(session_id)
        if current is not None and current.version == version:
            current.state = state

    async def delete(self, session_id: str) -> None:
        self._reachable()
        self.sessions.pop(session_id, None)
        self.events.pop(session_id, None)
        self.contexts.pop(session_id, None)

    async def count_owned(self, owner_id: str, limit: int, other_than: str | None = None) -> int:
        self._reachable()
        owned = (r.owner_id == owner_id and r.id != other_than for r in self.sessions.values())
        return min(limit, sum(owned))

    async def list_for(
        self,
        principal_sub: str | None,
        state: SessionState | None,
        limit: int,
        after: ListAfter | None,
        *,
        order: str = "id",
    ) -> Page:
        self._reachable()
        if order == "recent":
            ranked = sorted(self.sessions.values(), key=lambda r: (r.last_active, r.id))[::-1]
            position = None if after is None else (after.last_active, after.id)
            later = [r for r in ranked if position is None or (r.last_active, r.id) < position]
        else:
            later = [
                r for _, r in sorted(self.sessions.items()) if after is None or r.id > after.id
            ]
        found = [
            _copy(r)
            for r in later
            if (principal_sub is None or principal_sub == r.owner_id or principal_sub in r.acl)
            and (state is None or r.state is state)
        ]
        items = found[:limit]
        return Page(items=items, next_cursor=items[-1].id if len(found) > limit else None)


class _WatchFired(Exception):
    """The fake's WatchError: the session changed between the read and the commit."""


@dataclass
class InMemoryHotStore:
    recent_timeline: int = 20
    lease_ttl_s: int = 30
    hashes: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    timelines: dict[str, list[TimelineEvent]] = field(default_factory=dict)
    leases: dict[tuple[str, str], float] = field(default_factory=dict)
    """(session id, MAD) → monotonic deadline of the lease key."""
    idempotency: dict[str, bytes] = field(default_factory=dict)
    caller_keys: dict[str, set[str]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    outbox: list[OutboxEntry] = field(default_factory=list)
    dead_letters: list[OutboxEntry] = field(default_factory=list)
    down: bool = False
    """While True every call raises `BackendUnavailable("redis")`, as `RedisHotStore` does."""
    between_read_and_commit: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    """Actions run once each inside the next transaction, after its read, before its commit."""
    _revision: dict[str, int] = field(default_factory=dict)

    # -- helpers for tests -------------------------------------------------------------------

    def is_hot(self, session_id: str) -> bool:
        return session_id in self.hashes

    def lease_left_ms(self, session_id: str, mad: str) -> int:
        """Like PTTL: the lease key's remaining life, or -2 when there is none."""
        deadline = self.leases.get((session_id, mad))
        if deadline is None:
            return -2
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0:
            del self.leases[(session_id, mad)]
            return -2
        return left

    def set_lease_left_ms(self, session_id: str, mad: str, ms: int) -> None:
        """Like PEXPIRE on the lease key."""
        self.leases[(session_id, mad)] = time.monotonic() + ms / 1000

    # -- the HotStore port -------------------------------------------------------------------

    def _reachable(self) -> None:
        if self.down:
            raise BackendUnavailable("redis", "not reachable")

    def _touch(self, session_id: str) -> None:
        self._revision[session_id] = self._revision.get(session_id, 0) + 1

    def _view(self, session_id: str) -> HotView | None:
        raw = self.hashes.get(session_id)
        if raw is None:
            return None
        record = decode_record(raw)
        ttls = {mad: self.lease_left_ms(session_id, mad) for mad in record.participants}
        return HotView(
            record=record,
            recent=list(self.timelines.get(session_id, [])),
            lease_ttl_ms={mad: ttl for mad, ttl in ttls.items() if ttl > 0},
        )

    async def ping(self) -> None:
        self._reachable()

    async def load(self, session_id: str) -> HotView | None:
        self._reachable()
        return self._view(session_id)

    async def access_fields(self, session_id: str) -> tuple[str, list[str]] | None:
        self._reachable()
        view = self._view(session_id)
        return None if view is None else (view.record.owner_id, view.record.acl)

    async def create(self, record: SessionRecord, idem: Idempotency | None, result: bytes) -> None:
        self._reachable()
        self.hashes[record.id] = _as_hash(encode_record(record))
        if idem is not None:
            self.idempotency[_idem_key("create", idem)] = idem_value(idem, result)
        self._touch(record.id)

    async def activate(self, session_id: str, load: Loader) -> SessionRecord | None:
        self._reachable()
        if session_id in self.gone:
            raise SessionNotFound(session_id)
        if session_id in self.hashes:
            return None
        watched = self._revision.get(session_id, 0)
        record, recent = await load()
        if self._revision.get(session_id, 0) != watched:
            return None  # the WATCH fired: another activation or a suspend got there first
        self.hashes[session_id] = _as_hash(encode_record(record))
        self.timelines[session_id] = list(recent)
        self._touch(session_id)
        return record

    async def transact(
        self,
        session_id: str,
        decide: Decide,
        idem: Idempotency | None,
        *,
        names_version: bool = False,  # no turns here: nothing to refuse early
    ) -> Replayed | Change | None:
        for _ in range(8):
            try:
                return await self._transact_once(session_id, decide, idem)
            except _WatchFired:
                continue
        raise ConcurrencyConflict(session_id, self._current_version(session_id))

    async def _transact_once(
        self, session_id: str, decide: Decide, idem: Idempotency | None
    ) -> Replayed | Change | None:
        self._reachable()
        watched = self._revision.get(session_id, 0)
        if idem is not None and (
            replay := replay_of(idem, self.idempotency.get(_idem_key(session_id, idem)))
        ):
            return replay
        view = self._view(session_id)
        if view is None:
            return None
        change = decide(view)
        if change is None:
            return None
        while self.between_read_and_commit:
            await self.between_read_and_commit.pop(0)()
        self._reachable()
        if self._revision.get(session_id, 0) != watched:
            raise _WatchFired
        self._commit(session_id, change)
        if idem is not None:
            kept = change.result if change.stored is None else change.stored
            self.idempotency[_idem_key(session_id, idem)] = idem_value(idem, kept)
        return change

    def _commit(self, session_id: str, change: Change) -> None:
        if change.fields:
            self.hashes[session_id].update(_as_hash(encode_record(change.record, change.fields)))
        if change.events:
            timeline = self.timelines.setdefault(session_id, [])
            timeline.extend(change.events)
            del timeline[: -self.recent_timeline]
        for mad in change.leases_set:
            self.set_lease_left_ms(session_id, mad, self.lease_ttl_s * 1000)
        for mad in change.leases_dropped:
            self.leases.pop((session_id, mad), None)
        if not change.hot_only and (change.fields or change.events or change.context):
            self.outbox.append(
                OutboxEntry(record=change.record, events=change.events, context=change.context)
            )
        self._touch(session_id)

    async def replay(self, scope: str, idem: Idempotency) -> Replayed | None:
        self._reachable()
        return replay_of(idem, self.idempotency.get(_idem_key(scope, idem)))

    async def claim(self, scope: str, idem: Idempotency) -> Replayed | None:
        self._reachable()
        key = _idem_key(scope, idem)
        if key not in self.idempotency:
            self.idempotency[key] = pending_value(idem)
            return None
        return replay_of(idem, self.idempotency[key])

    async def release(self, scope: str, idem: Idempotency) -> None:
        self._reachable()
        key = _idem_key(scope, idem)
        if self.idempotency.get(key) == pending_value(idem):
            del self.idempotency[key]

    async def admit_key(self, idem: Idempotency, cap: int) -> None:
        self._reachable()
        self.caller_keys.setdefault(idem.caller, set()).add(idem.key_digest)
        if len(self.caller_keys[idem.caller]) > cap:
            self.caller_keys[idem.caller].discard(idem.key_digest)
            raise TooManyIdempotencyKeys(cap, 86_400)

    async def remember(self, scope: str, idem: Idempotency, result: bytes) -> None:
        self._reachable()
        self.idempotency[_idem_key(scope, idem)] = idem_value(idem, result)

    async def suspend(
        self, session_id: str, flush: Flush, check: RecordCheck | None = None
    ) -> SessionRecord | None:
        for _ in range(8):
            self._reachable()
            watched = self._revision.get(session_id, 0)
            view = self._view(session_id)
            if view is None:
                return None
            record = view.record
            if check is not None:
                check(record)
            record.state = SessionState.DORMANT
            backlog = await self.undelivered(session_id)
            await flush(record, [*backlog.events, *view.recent], backlog.context)
            if self._revision.get(session_id, 0) != watched:
                continue
            self._drop(session_id)
            return record
        raise ConcurrencyConflict(session_id, self._current_version(session_id))

    async def undelivered(self, session_id: str) -> Undelivered:
        self._reachable()
        mine = [entry for entry in self.outbox if entry.record.id == session_id]
        contexts = [entry.context for entry in mine if entry.context is not None]
        return Undelivered(
            events=[e for entry in mine for e in entry.events],
            context=max(contexts, key=lambda c: c.version, default=None),
        )

    async def parked(self, session_id: str) -> int:
        self._reachable()
        return sum(1 for entry in self.dead_letters if entry.record.id == session_id)

    async def is_deleted(self, session_id: str) -> bool:
        self._reachable()
        return session_id in self.gone

    async def mark_deleted(self, session_id: str) -> None:
        self._reachable()
        self.gone.add(session_id)

    async def note(self, session_id: str, version: int, kind: str) -> None:
        self._reachable()  # the change feed is Redis's (tests/integration/test_change_feed.py)

    async def drop(self, session_id: str) -> None:
        self._reachable()
        self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        self.hashes.pop(session_id, None)
        self.timelines.pop(session_id, None)
        for key in [k for k in self.leases if k[0] == session_id]:
            del self.leases[key]
        self._touch(session_id)

    def _current_version(self, session_id: str) -> int | None:
        raw = self.hashes.get(session_id)
        return None if raw is None else int(raw[b"version"])


def _as_hash(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    return {name.encode(): value for name, value in fields.items()}


def _idem_key(scope: str, idem: Idempotency) -> str:
    return f"{scope}:{idem.key_digest}"


@dataclass
class World:
    """A `SessionService` over a fresh in-memory hot store and warm store."""

    service: SessionService
    hot: InMemoryHotStore
    warm: InMemoryWarmStore
    limits: Limits

    async def deliver_outbox(self) -> None:
        """Do what the write-behind worker does: carry every outbox entry to the warm store."""
        while self.hot.outbox:
            entry = self.hot.outbox.pop(0)
            await self.warm.apply(entry.record, entry.events, entry.context)


def world(limits: Limits | None = None) -> World:
    limits = limits or Limits()
    hot = InMemoryHotStore(recent_timeline=limits.recent_timeline, lease_ttl_s=limits.lease_ttl_s)
    warm = InMemoryWarmStore()
    return World(SessionService(hot, warm, limits), hot, warm, limits)

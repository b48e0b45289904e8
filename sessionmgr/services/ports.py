"""The small typed interfaces the services know storage by."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from sessionmgr.domain.model import ContextUpdate, SessionRecord, SessionState, TimelineEvent


class HotView(msgspec.Struct, kw_only=True):
    """What a hot read returns: the record, its recent events and each lease's remaining life."""

    record: SessionRecord
    recent: list[TimelineEvent]
    lease_ttl_ms: dict[str, int] = msgspec.field(default_factory=dict)


class Change(msgspec.Struct, kw_only=True):
    """What a decision inside the optimistic transaction wants written.

    `fields` are the record's new top-level values (only those that change); `events` are
    appended to the timeline; `context` is a new `full_context` (it goes to MongoDB through
    the outbox, never into the hash); `leases_set`/`leases_dropped` name MADs whose lease key
    is (re)created or deleted. `result` is the caller's answer, kept for Idempotency-Key
    replays.
    """

    record: SessionRecord
    fields: frozenset[str]
    events: list[TimelineEvent] = msgspec.field(default_factory=list)
    context: ContextUpdate | None = None
    leases_set: list[str] = msgspec.field(default_factory=list)
    leases_dropped: list[str] = msgspec.field(default_factory=list)
    result: bytes = b""


class Idempotency(msgspec.Struct, frozen=True):
    """A client's Idempotency-Key, scoped to its principal, with the request's fingerprint."""

    key_digest: str
    fingerprint: str


Decide = Callable[[HotView], Change | None]
CREATE_SCOPE = "create"  # idempotency scope of creates; every other scope is a session id


class Replayed(msgspec.Struct, frozen=True):
    result: bytes


class Undelivered(msgspec.Struct, frozen=True):
    """What the outbox still holds for a session: events and the newest `full_context`."""

    events: list[TimelineEvent]
    context: ContextUpdate | None


Loader = Callable[[], Awaitable[tuple[SessionRecord, list[TimelineEvent]]]]
Flush = Callable[[SessionRecord, list[TimelineEvent], "ContextUpdate | None"], Any]


class HotStore(Protocol):
    async def load(self, session_id: str) -> HotView | None: ...
    async def access_fields(self, session_id: str) -> tuple[str, list[str]] | None: ...
    async def create(
        self, record: SessionRecord, idem: Idempotency | None, result: bytes
    ) -> None: ...
    async def activate(self, session_id: str, load: Loader) -> SessionRecord | None: ...
    async def transact(
        self, session_id: str, decide: Decide, idem: Idempotency | None
    ) -> Replayed | Change | None: ...
    async def replay(self, scope: str, idem: Idempotency) -> Replayed | None: ...
    async def claim(self, scope: str, idem: Idempotency) -> Replayed | None: ...
    async def remember(self, scope: str, idem: Idempotency, result: bytes) -> None: ...
    async def release(self, scope: str, idem: Idempotency) -> None: ...
    async def renew_lease(self, session_id: str, mad: str) -> int: ...
    async def suspend(self, session_id: str, flush: Flush) -> SessionRecord | None: ...
    async def undelivered(self, session_id: str) -> Undelivered: ...
    async def mark_deleted(self, session_id: str) -> None: ...
    async def drop(self, session_id: str) -> None: ...
    async def ping(self) -> None: ...


class Page(msgspec.Struct, frozen=True):
    items: list[SessionRecord]
    next_cursor: str | None


class WarmStore(Protocol):
    async def insert(self, record: SessionRecord) -> None: ...
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def recent_events(self, session_id: str, limit: int) -> list[TimelineEvent]: ...
    async def all_events(self, session_id: str) -> list[TimelineEvent]: ...
    async def context(self, session_id: str) -> ContextUpdate | None: ...
    async def apply(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool: ...
    async def flush(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool: ...
    async def mark_state(self, session_id: str, version: int, state: SessionState) -> None: ...
    async def delete(self, session_id: str) -> None: ...
    async def list_for(
        self, principal_sub: str | None, state: SessionState | None, limit: int, after: str | None
    ) -> Page: ...
    async def ping(self) -> None: ...

"""The small typed interfaces the services know storage by."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec

from sessionmgr.domain.model import (
    ArchiveRef,
    ContextUpdate,
    SessionRecord,
    SessionState,
    TimelineEvent,
)


class HotView:
    """What a hot read returns: the record, its recent events and each lease's remaining life.

    `recent` is given as the events or as a function that decodes them, called once, when a
    decision first asks for them. An append, a leave or a lease renewal never does (a patch
    or a join answers the session, events and all): decoding the last 20 events was about
    5 us of an append's 72 in one process (bench/profiles/findings.md).
    """

    __slots__ = ("_recent", "lease_ttl_ms", "record")

    def __init__(
        self,
        *,
        record: SessionRecord,
        recent: list[TimelineEvent] | Callable[[], list[TimelineEvent]],
        lease_ttl_ms: dict[str, int] | None = None,
    ) -> None:
        self.record = record
        self._recent = recent
        self.lease_ttl_ms = {} if lease_ttl_ms is None else lease_ttl_ms

    @property
    def recent(self) -> list[TimelineEvent]:
        if callable(self._recent):
            self._recent = self._recent()
        return self._recent

    def with_record(self, record: SessionRecord) -> HotView:
        """This view with another record; its events are decoded only if asked for."""
        return HotView(record=record, recent=self._recent, lease_ttl_ms=self.lease_ttl_ms)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HotView):
            return NotImplemented
        return (self.record, self.recent, self.lease_ttl_ms) == (
            other.record,
            other.recent,
            other.lease_ttl_ms,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the Struct it replaced

    def __repr__(self) -> str:
        return (
            f"HotView(record={self.record!r}, recent={self.recent!r}, "
            f"lease_ttl_ms={self.lease_ttl_ms!r})"
        )


class Change(msgspec.Struct, kw_only=True):
    """What a decision inside the optimistic transaction wants written.

    `fields` are the record's new top-level values (only those that change); `events` are
    appended to the timeline; `context` is a new `full_context` (it goes to MongoDB through
    the outbox, never into the hash); `leases_set`/`leases_dropped` name MADs whose lease key
    is (re)created or deleted. `result` is the caller's answer, kept for Idempotency-Key
    replays. A `hot_only` change (lease bookkeeping: a renewal's new expiry) keeps the
    version and writes no outbox entry; MongoDB gets it with the next versioned write or the
    suspend flush.
    """

    record: SessionRecord
    fields: frozenset[str]
    events: list[TimelineEvent] = msgspec.field(default_factory=list)
    context: ContextUpdate | None = None
    leases_set: list[str] = msgspec.field(default_factory=list)
    leases_dropped: list[str] = msgspec.field(default_factory=list)
    result: bytes = b""
    stored: bytes | None = None  # what the idempotency record keeps, when not `result`
    hot_only: bool = False


class Idempotency(msgspec.Struct, frozen=True):
    """A client's Idempotency-Key, scoped to its principal, with the request's fingerprint.

    `caller` names the principal (a digest), for the cap on its live keys; `attempt` is this
    request's own: a claim carries it, so an attempt that fails late can release only its
    own claim, never that of a newer retry with the same key.
    """

    key_digest: str
    fingerprint: str
    caller: str = ""
    attempt: str = msgspec.field(default_factory=lambda: secrets.token_hex(8))


Decide = Callable[[HotView], Change | None]
CREATE_SCOPE = "create"  # idempotency scope of creates; every other scope is a session id


class Replayed(msgspec.Struct, frozen=True):
    """The first answer to a key; a `receipt` (session id and version) stands in for an
    answer too large to keep (`SESSIONMGR_IDEMPOTENCY_MAX_ANSWER_BYTES`)."""

    result: bytes

    @property
    def receipt(self) -> Receipt | None:
        if not self.result.startswith(RECEIPT):
            return None
        return msgspec.json.decode(self.result[len(RECEIPT) :], type=Receipt)


class Receipt(msgspec.Struct, frozen=True):
    id: str
    version: int


RECEIPT = b"\x00receipt:"  # never the start of a JSON answer


class Undelivered(msgspec.Struct, frozen=True):
    """What the outbox still holds for a session: events and the newest `full_context`."""

    events: list[TimelineEvent]
    context: ContextUpdate | None


class OutboxEntry(msgspec.Struct, frozen=True):
    """One write-behind delivery: the whole record at a version, the events it appended and,
    when it changed, the new `full_context`."""

    record: SessionRecord
    events: list[TimelineEvent] = []
    context: ContextUpdate | None = None


Loader = Callable[[], Awaitable[tuple[SessionRecord, list[TimelineEvent]]]]
RecordCheck = Callable[[SessionRecord], None]
"""A condition on the record a store reads inside its transaction (an If-Match); it raises."""
Flush = Callable[[SessionRecord, list[TimelineEvent], "ContextUpdate | None"], Any]


class HotStore(Protocol):
    async def load(self, session_id: str) -> HotView | None: ...
    async def access_fields(self, session_id: str) -> tuple[str, list[str]] | None: ...
    async def create(
        self, record: SessionRecord, idem: Idempotency | None, result: bytes
    ) -> None: ...
    async def activate(self, session_id: str, load: Loader) -> SessionRecord | None: ...
    async def transact(
        self,
        session_id: str,
        decide: Decide,
        idem: Idempotency | None,
        *,
        names_version: bool = False,
    ) -> Replayed | Change | None: ...
    async def replay(self, scope: str, idem: Idempotency) -> Replayed | None: ...
    async def claim(self, scope: str, idem: Idempotency) -> Replayed | None: ...
    async def admit_key(self, idem: Idempotency, cap: int) -> None: ...
    async def remember(self, scope: str, idem: Idempotency, result: bytes) -> None: ...
    async def release(self, scope: str, idem: Idempotency) -> None: ...
    async def suspend(
        self, session_id: str, flush: Flush, check: RecordCheck | None = None
    ) -> SessionRecord | None: ...
    async def undelivered(self, session_id: str) -> Undelivered: ...
    async def parked(self, session_id: str) -> int: ...
    async def is_deleted(self, session_id: str) -> bool: ...
    async def mark_deleted(self, session_id: str) -> None: ...
    async def note(self, session_id: str, version: int, kind: str) -> None: ...
    async def drop(self, session_id: str) -> None: ...
    async def fence(self, session_id: str, ttl_s: int) -> str | None: ...
    async def unfence(self, session_id: str, token: str) -> None: ...
    async def rebase(self, diverged: WriteDiverged) -> str: ...
    async def ping(self) -> None: ...


class Page(msgspec.Struct, frozen=True):
    items: list[SessionRecord]
    next_cursor: str | None


class ListAfter(msgspec.Struct, frozen=True):
    """Where a page of a session list starts: after this id (and, by recency, this instant)."""

    id: str
    last_active: datetime | None = None


class WarmStore(Protocol):
    async def insert(self, record: SessionRecord) -> bool: ...
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def recent_events(self, session_id: str, limit: int) -> list[TimelineEvent]: ...
    async def all_events(self, session_id: str) -> list[TimelineEvent]: ...
    async def events_after(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[TimelineEvent]: ...
    async def context(self, session_id: str) -> ContextUpdate | None: ...
    async def apply(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool: ...
    async def apply_many(self, entries: Sequence[OutboxEntry]) -> list[int]:
        """Write-behind of a batch: what `apply` of each entry would do, in a few round trips
        for the whole batch. Returns the indexes of the entries it left to `apply` one at a
        time (a session gone, archived, or whose write clashes). An outage raises
        `BackendUnavailable`; any other error means "deliver these one at a time". Every part
        is idempotent, so what a failed batch did write is harmless to write again."""
        ...

    async def flush(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool: ...
    async def mark_state(self, session_id: str, version: int, state: SessionState) -> None: ...
    async def keep_conflict(self, diverged: WriteDiverged) -> bool: ...
    async def delete(self, session_id: str) -> None: ...
    async def count_owned(
        self, owner_id: str, limit: int, other_than: str | None = None
    ) -> int: ...
    async def list_for(
        self,
        principal_sub: str | None,
        state: SessionState | None,
        limit: int,
        after: ListAfter | None,
        *,
        order: str = "id",
    ) -> Page: ...
    async def ping(self) -> None: ...


# -- the cold tier -----------------------------------------------------------------------------


class SessionArchive(msgspec.Struct, kw_only=True):
    """The whole MongoDB record of a session, as one S3 object holds it (gzipped JSON)."""

    format: int = 1
    record: SessionRecord
    context: ContextUpdate
    events: list[TimelineEvent]


class StoredSession(msgspec.Struct, kw_only=True):
    """A session document as MongoDB holds it: full, or a stub whose body is in S3.

    `purge_pending` marks a stub whose events may still be in MongoDB (an archive stopped
    between its stub write and its events delete); `cold_key` names the S3 object that holds,
    or once held, a copy, so deleting the session deletes that too.
    """

    record: SessionRecord
    archive: ArchiveRef | None = None
    purge_pending: bool = False
    cold_key: str | None = None


class WarmArchive(Protocol):
    """What archiving needs of MongoDB; every replacing write is conditional."""

    async def stored(self, session_id: str) -> StoredSession | None: ...
    async def export(self, session_id: str) -> SessionArchive | None: ...
    async def to_stub(self, record: SessionRecord, ref: ArchiveRef) -> bool: ...
    async def purge_events(self, session_id: str) -> None: ...
    async def purged(self, session_id: str, ref: ArchiveRef) -> None: ...
    async def insert_events(self, session_id: str, events: list[TimelineEvent]) -> None: ...
    async def restore(self, archive: SessionArchive, ref: ArchiveRef) -> bool: ...
    async def archive_candidates(self, idle_since: datetime, limit: int) -> list[str]: ...


class ArchiveStore(Protocol):
    """S3 (or anything speaking its API): whole objects by key."""

    async def put(self, key: str, body: bytes) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def size(self, key: str) -> int | None: ...
    async def delete(self, key: str) -> None: ...
    async def ping(self) -> None: ...


# -- divergence: Redis lost acknowledged writes and reused their versions or seqs ---------------


class WriteDiverged(Exception):
    """MongoDB holds another write at this write's version (`version_clash`) or at some of its
    events' seqs (`events`, the incoming ones). Everything that did not clash was written."""

    def __init__(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None,
        *,
        version_clash: bool,
        stored: SessionRecord | None,
        stored_seq: int,
    ) -> None:
        super().__init__(
            f"write {record.write_id or '?'} of session {record.id} v{record.version} diverges "
            f"from MongoDB (v{stored.version if stored else '?'}, seq {stored_seq}): "
            f"{'its version' if version_clash else 'no version'} and {len(events)} event(s) clash"
        )
        self.record = record
        self.events = events
        self.context = context
        self.version_clash = version_clash
        self.stored = stored
        self.stored_seq = stored_seq

    @property
    def session_id(self) -> str:
        return self.record.id

    @property
    def floor_version(self) -> int:
        return self.stored.version if self.stored else self.record.version


REBASED, DONE, AT_REST = "rebased", "done", "at-rest"  # what `HotStore.rebase` did


class SessionRebased(Exception):
    """The hot session was re-based after a divergence: read it again and start over."""


# -- the idle sweep: active sessions by age, and one sweeper at a time --------------------------


class IdleIndex(Protocol):
    """Active sessions by when they were last written or loaded (epoch seconds)."""

    async def older_than(
        self, cutoff: float, limit: int, offset: int = 0
    ) -> list[tuple[str, float]]: ...
    async def forget(self, session_id: str, cutoff: float) -> bool: ...
    async def postpone(self, session_id: str, at: float) -> None: ...
    async def size(self) -> int: ...
    async def backfill(self) -> int: ...


class SweepLock(Protocol):
    """A lock with a TTL and a token: only the holder extends or releases it."""

    async def acquire(self, ttl_ms: int) -> str | None: ...
    async def extend(self, token: str, ttl_ms: int) -> bool: ...
    async def release(self, token: str) -> None: ...


# -- the outbox, as the write-behind consumes it ------------------------------------------------


class Delivery(msgspec.Struct, frozen=True):
    """One outbox entry as a consumer reads it. `entry` is None when the entry is gone from
    the outbox (`deleted`, still on the consumer's pending list) or cannot be decoded
    (`problem` says why); `raw` is the store's own form, handed back to `Outbox.park`."""

    id: bytes
    raw: dict[bytes, bytes]
    entry: OutboxEntry | None = None
    problem: str = ""

    @property
    def deleted(self) -> bool:
        return not self.raw


class OutboxConsumer(msgspec.Struct, frozen=True):
    name: str
    pending: int
    idle_ms: int


class Outbox(Protocol):
    """The outbox behind the write-behind: entries are read by named consumers of one group,
    stay pending until acknowledged, and can be claimed from a consumer that went quiet or
    parked on a dead-letter list. A store failure raises `BackendUnavailable`."""

    dead_letter_name: str

    async def ensure_group(self) -> None: ...
    async def read(
        self, consumer: str, after: str | bytes, count: int, block_ms: int | None = None
    ) -> list[Delivery]: ...
    async def claim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[Delivery]]: ...
    async def consumers(self) -> list[OutboxConsumer]: ...
    async def remove_consumer(self, name: str) -> None: ...
    async def ack(self, entry_id: bytes) -> None: ...
    async def ack_many(self, entry_ids: Sequence[bytes]) -> None: ...
    async def park(self, delivery: Delivery, error: str, attempts: int) -> int: ...
    async def dead_letters(self) -> int: ...
    async def pending(self) -> int: ...
    async def oldest_age_s(self) -> float: ...

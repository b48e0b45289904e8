"""The warm tier: MongoDB through Beanie (documents, indexes) and Motor (guarded writes).

This is the only module that talks to MongoDB. Sessions live in `sessions`, one document each;
timeline events in `session_events`, one document each, unique on (session_id, seq), so a long
session never meets the 16 MB document limit and replays of an event are harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import bson
import msgspec
from beanie import Document, init_beanie
from motor.motor_asyncio import AsyncIOMotorClient
from pydantic import Field
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
    WTimeoutError,
)

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import (
    ArchiveRef,
    ContextUpdate,
    SessionRecord,
    SessionState,
    TimelineEvent,
    utcnow,
)
from sessionmgr.services.ports import (
    ListAfter,
    OutboxEntry,
    Page,
    SessionArchive,
    StoredSession,
    WriteDiverged,
)
from sessionmgr.settings import Settings
from sessionmgr.storage.insert_batch import InsertBatch
from sessionmgr.storage.mongo_errors import DUPLICATE_KEY, describe, is_outage

T = TypeVar("T")
_TRANSIENT = (ConnectionFailure, ExecutionTimeout, WTimeoutError)


class SessionDocument(Document):
    """A session's full record; `archive` is set (and the body gone) once it lives in S3."""

    id: str = Field(alias="_id")  # type: ignore[assignment]
    version: int
    state: str
    owner_id: str
    acl: list[str] = []
    created_at: datetime
    last_active: datetime
    participants: dict[str, Any] = {}
    work_in_progress: dict[str, Any] = {}
    context_summary: dict[str, Any] = {}
    full_context: dict[str, Any] = {}
    context_version: int = 0
    timeline_seq: int = 0
    archive: dict[str, Any] | None = None
    purge_pending: bool = False
    cold_key: str | None = None

    class Settings:
        name = "sessions"
        indexes = [
            IndexModel([("owner_id", ASCENDING), ("_id", ASCENDING)], name="owner_id"),
            IndexModel([("acl", ASCENDING), ("_id", ASCENDING)], name="acl"),
            IndexModel([("state", ASCENDING), ("last_active", ASCENDING)], name="state_age"),
            IndexModel([("last_active", DESCENDING), ("_id", DESCENDING)], name="recent"),
        ]


class EventDocument(Document):
    session_id: str
    seq: int
    at: datetime
    actor: str
    kind: str
    data: dict[str, Any] = {}

    class Settings:
        name = "session_events"
        indexes = [
            IndexModel(
                [("session_id", ASCENDING), ("seq", ASCENDING)], name="session_seq", unique=True
            ),
        ]


class WriteDocument(Document):
    """Which write made each version of a session (`_id` is `<session id>:<version>`)."""

    session_id: str
    wid: str

    class Settings:
        name = "session_writes"
        indexes = [IndexModel([("session_id", ASCENDING)], name="session")]


class ConflictDocument(Document):
    """A write kept after a divergence: what came in, and what MongoDB held then."""

    session_id: str
    at: datetime
    incoming: dict[str, Any]
    stored: dict[str, Any] | None = None

    class Settings:
        name = "session_conflicts"
        indexes = [IndexModel([("session_id", ASCENDING)], name="session")]


def _to_doc(record: SessionRecord) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(record, builtin_types=(datetime,))
    doc["_id"] = doc.pop("id")
    return doc


def _write_key(record: SessionRecord) -> str:
    """The ledger's id for the write that made `record.version`."""
    return f"{record.id}:{record.version}"


def _from_doc(doc: dict[str, Any]) -> SessionRecord:
    doc = {k: v for k, v in doc.items() if k not in _NOT_IN_RECORD}
    doc["id"] = doc.pop("_id")
    return msgspec.convert(doc, SessionRecord)


_NOT_IN_RECORD = frozenset(
    {"full_context", "context_version", "archive", "purge_pending", "cold_key"}
)


# What a conflict's document may take before its parts go to documents of their own: under
# MongoDB's 16 MiB limit, with room for the command around it. Events go apart in groups of
# at most `CONFLICT_EVENTS_PART_BYTES`.
CONFLICT_DOCUMENT_BYTES = 16 * 1024 * 1024 - 64 * 1024
CONFLICT_EVENTS_PART_BYTES = 8 * 1024 * 1024


def _conflict_parts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a conflict too large for one document (two full records, `full_context` and a
    suspend's whole backlog of events can pass 16 MiB) into documents of its own. The events
    go first, in groups; then, while `doc` is still too large, the context, what MongoDB
    held and the incoming record. Each part is named by a digest of the conflict's id
    (`doc["parts"]`, the parts' `part_of`) and keeps its session, so a session's delete takes
    it. Each fits: a group of events by its bound, an event, a context or a record alone by
    the limits of domain/rules.py, whose overhead allowance leaves room for a part's own
    fields. Returns the parts (none when `doc` fits as it is); `doc` says what went apart."""
    if len(bson.encode(doc)) <= CONFLICT_DOCUMENT_BYTES:
        return []
    tag = hashlib.sha256(doc["_id"].encode()).hexdigest()[:32]
    doc["parts"] = tag
    parts: list[dict[str, Any]] = []

    def apart(name: str, field: str, value: Any) -> None:
        part = {"_id": f"{tag}:{name}", "session_id": doc["session_id"], "part_of": tag}
        parts.append(part | {field: value})

    incoming = doc["incoming"]
    group: list[Any] = []
    size = groups = 0
    for event in incoming["events"]:
        event_size = len(bson.encode({"e": event}))
        if group and size + event_size > CONFLICT_EVENTS_PART_BYTES:
            apart(f"events{groups}", "events", group)
            group, size, groups = [], 0, groups + 1
        group.append(event)
        size += event_size
    if group:
        apart(f"events{groups}", "events", group)
    incoming["events_apart"], incoming["events"] = len(incoming["events"]), []
    for name, holder in (("context", incoming), ("stored", doc), ("record", incoming)):
        if len(bson.encode(doc)) <= CONFLICT_DOCUMENT_BYTES or holder[name] is None:
            continue
        apart(name, name, holder[name])
        holder[name], holder[f"{name}_apart"] = None, True
    return parts


def _only_duplicates(exc: BulkWriteError) -> bool:
    """Whether an unordered insert met nothing but ids already taken (done, or a clash the
    caller looks into); any other write error is the caller's to raise."""
    return all(e.get("code") == DUPLICATE_KEY for e in exc.details.get("writeErrors", []))


def _event_doc(session_id: str, event: TimelineEvent) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(event, builtin_types=(datetime,))
    doc["session_id"] = session_id
    return doc


def _same_event(a: TimelineEvent, b: TimelineEvent) -> bool:
    return (a.at, a.actor, a.kind, a.data) == (b.at, b.actor, b.kind, b.data)


def _from_event_doc(doc: dict[str, Any]) -> TimelineEvent:
    return TimelineEvent(
        seq=doc["seq"], at=doc["at"], actor=doc["actor"], kind=doc["kind"], data=doc["data"]
    )


class MongoWarmStore:
    """`WarmStore` on Motor collections; every write to a session is version-guarded."""

    def __init__(self, client: Any, db_name: str, *, batch_inserts: bool = True) -> None:
        self._client = client
        self._db = client[db_name]
        self._sessions = self._db[SessionDocument.Settings.name]
        self._events = self._db[EventDocument.Settings.name]
        self._writes = self._db[WriteDocument.Settings.name]
        self._conflicts = self._db[ConflictDocument.Settings.name]
        # A create's document goes with the others of its event-loop turn (group commit).
        self._inserts = InsertBatch(lambda: self._sessions) if batch_inserts else None
        # mongomock (the in-memory store of `sessionmgr dev` and the tests) cannot take
        # PyMongo's `UpdateOne` in `bulk_write` (it passes a `sort` mongomock does not know):
        # there a batch's documents are written one call each, which costs it nothing.
        self._bulk_writes = not any(
            kind.__module__.startswith("mongomock") for kind in type(client).__mro__
        )

    async def ping(self) -> None:
        await _guard(self._db.command("ping"))

    async def insert(self, record: SessionRecord) -> bool:
        """Store a new session; False when one with its id exists (a retried keyed create).

        One write: the document is the note of which write made version 1 (it carries
        `write_id`, and the unique `_id` lets one create's document in), so the ledger gets
        no entry for it (`_written_by`). Issue 16: that entry was half of a create's MongoDB
        writes, and one noted by an attempt whose document insert then failed made the
        retry's own version 1 look like a divergence at its first flush. The document goes
        with the others of this event-loop turn, in one insert (storage/insert_batch.py)."""
        doc = {**_to_doc(record), "full_context": {}, "context_version": 0}
        inserted = self._inserts.call(doc) if self._inserts else self._sessions.insert_one(doc)
        try:
            await _guard(inserted)
        except DuplicateKeyError:
            return False
        return True

    async def _written_by(self, record: SessionRecord) -> str | None:
        """Note which write made `record.version`; returns the write MongoDB had noted for it
        before, if another. Harmless to repeat: the same write is noted once.

        Version 1 is noted by the document itself (`insert`): it is compared with the stored
        document while that is at version 1. Once past it, a write of version 1 can change
        no field (`apply` and `flush` are guarded on the version), and its events are checked
        on their own (`_insert_events`)."""
        if not record.write_id:
            return None  # written before write ids existed
        if record.version == 1:
            stored = await _guard(
                self._sessions.find_one({"_id": record.id, "version": 1}, {"write_id": 1})
            )
            created_by = (stored or {}).get("write_id")
            return str(created_by) if created_by and created_by != record.write_id else None
        key = _write_key(record)
        try:
            await _guard(
                self._writes.insert_one(
                    {"_id": key, "session_id": record.id, "wid": record.write_id}
                )
            )
        except DuplicateKeyError:
            noted = await _guard(self._writes.find_one({"_id": key}))
            if noted is not None and noted.get("wid") != record.write_id:
                return str(noted.get("wid"))
        return None

    async def context(self, session_id: str) -> ContextUpdate | None:
        doc = await _guard(
            self._sessions.find_one({"_id": session_id}, {"full_context": 1, "context_version": 1})
        )
        if doc is None:
            return None
        return ContextUpdate(
            version=doc.get("context_version", 0), value=doc.get("full_context", {})
        )

    async def get(self, session_id: str) -> SessionRecord | None:
        doc = await _guard(self._sessions.find_one({"_id": session_id}))
        return None if doc is None else _from_doc(doc)

    async def recent_events(self, session_id: str, limit: int) -> list[TimelineEvent]:
        cursor = self._events.find({"session_id": session_id}).sort("seq", DESCENDING)
        docs = await _guard(cursor.limit(limit).to_list(limit))
        return [_from_event_doc(d) for d in reversed(docs)]

    async def all_events(self, session_id: str) -> list[TimelineEvent]:
        cursor = self._events.find({"session_id": session_id}).sort("seq", ASCENDING)
        return [_from_event_doc(d) for d in await _guard(cursor.to_list(None))]

    async def events_after(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[TimelineEvent]:
        """Up to `limit` events with a seq above `after_seq`, oldest first (the seq index)."""
        query = {"session_id": session_id, "seq": {"$gt": after_seq}}
        cursor = self._events.find(query).sort("seq", ASCENDING).limit(limit)
        return [_from_event_doc(d) for d in await _guard(cursor.to_list(limit))]

    async def apply(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        """Write-behind: store `record` unless MongoDB holds its version or a newer one.

        Events are stored whatever the version (they are keyed by seq), and `full_context`
        unless a newer one is stored (it has its own version), so deliveries in any order
        converge. Returns False when the session no longer exists.
        """
        return await self._write(record, events, context, {"$lt": record.version})

    async def apply_many(self, entries: Sequence[OutboxEntry]) -> list[int]:
        """Write-behind of a batch with the effect of `apply` on each entry, in five round
        trips for the whole batch instead of four per entry: which sessions are there, the
        ledger of write ids, the documents (the newest version of each session, and its
        newest `full_context`) in one bulk write, the events in one insert, and which
        sessions were deleted meanwhile.

        The guards are `apply`'s (`version` and `context_version` below the incoming one,
        events keyed by seq), so the newest record of a session stands for the older ones in
        the batch. A session that is gone or archived, that has an entry of version 1 (the
        document notes that version, `insert`), or whose write clashes (the ledger holds
        another write at its version, or MongoDB another event at its seq) is left to `apply`
        one entry at a time: its indexes are returned, and `apply` meets the same thing
        again and answers it as it always does (`WriteDiverged` for a clash).
        """
        by_session: dict[str, list[int]] = {}
        for index, entry in enumerate(entries):
            by_session.setdefault(entry.record.id, []).append(index)
        found = self._sessions.find({"_id": {"$in": list(by_session)}}, {"archive": 1})
        live = {d["_id"] for d in await _guard(found.to_list(None)) if d.get("archive") is None}
        live -= {entry.record.id for entry in entries if entry.record.version == 1}
        left = {i for sid, indexes in by_session.items() if sid not in live for i in indexes}
        clashed = await self._note_writes(
            [entries[i].record for sid in live for i in by_session[sid]]
        )
        settled = {sid: [entries[i] for i in by_session[sid]] for sid in live if sid not in clashed}
        await self._write_documents(settled)
        clashed |= await self._insert_batch_events(settled)
        left |= {i for sid in clashed for i in by_session[sid]}
        with_events = [sid for sid, group in settled.items() if any(e.events for e in group)]
        if with_events:
            there = self._sessions.find({"_id": {"$in": with_events}}, {"_id": 1})
            gone = set(with_events) - {d["_id"] for d in await _guard(there.to_list(None))}
            if gone:  # deleted while we wrote: take back what we added, leave no orphans
                await _guard(self._events.delete_many({"session_id": {"$in": sorted(gone)}}))
        return sorted(left)

    async def _note_writes(self, records: list[SessionRecord]) -> set[str]:
        """`_written_by` for many records in one insert; the sessions of those whose version
        the ledger holds for another write."""
        records = [r for r in records if r.write_id]
        if not records:
            return set()
        docs = [{"_id": _write_key(r), "session_id": r.id, "wid": r.write_id} for r in records]
        try:
            await _guard(self._writes.insert_many(docs, ordered=False))
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            errors = exc.details.get("writeErrors", [])
            # Each refused record on its own: two records of one version (a divergent write
            # and a duplicate of the noted one) share a key, and either may be the clash.
            refused = [(docs[err["index"]]["_id"], records[err["index"]]) for err in errors]
            noted = self._writes.find({"_id": {"$in": sorted({key for key, _r in refused})}})
            holders = {d["_id"]: d.get("wid") for d in await _guard(noted.to_list(None))}
            return {r.id for key, r in refused if holders.get(key, r.write_id) != r.write_id}
        return set()

    async def _write_documents(self, settled: dict[str, list[OutboxEntry]]) -> None:
        """The newest record of each session and its newest `full_context`, one bulk write."""
        writes: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for session_id, group in settled.items():
            newest = max(group, key=lambda e: e.record.version).record
            doc = _to_doc(newest)
            del doc["_id"]
            writes.append(({"_id": session_id, "version": {"$lt": newest.version}}, {"$set": doc}))
            contexts = [e.context for e in group if e.context is not None]
            if contexts:
                context = max(contexts, key=lambda c: c.version)
                changed = {"full_context": context.value, "context_version": context.version}
                writes.append(
                    (
                        {"_id": session_id, "context_version": {"$lt": context.version}},
                        {"$set": changed},
                    )
                )
        if not self._bulk_writes:
            for where, change in writes:
                await _guard(self._sessions.update_one(where, change))
        elif writes:
            bulk = [UpdateOne(where, change) for where, change in writes]
            await _guard(self._sessions.bulk_write(bulk, ordered=False))

    async def _insert_batch_events(self, settled: dict[str, list[OutboxEntry]]) -> set[str]:
        """Every event of the batch in one insert; the sessions MongoDB holds another event
        for at one of their seqs (the same event again is done)."""
        owned = [
            (sid, event) for sid, group in settled.items() for e in group for event in e.events
        ]
        if not owned:
            return set()
        try:
            await _guard(
                self._events.insert_many([_event_doc(sid, e) for sid, e in owned], ordered=False)
            )
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            errors = exc.details.get("writeErrors", [])
            taken: dict[str, list[TimelineEvent]] = {}
            for err in errors:
                sid, event = owned[err["index"]]
                taken.setdefault(sid, []).append(event)
            return {sid for sid, events in taken.items() if await self._other_events(sid, events)}
        return set()

    async def flush(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        """Suspend: like `apply`, but also replaces the same version (to record the state)."""
        return await self._write(record, events, context, {"$lte": record.version})

    async def _write(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None,
        guard: dict[str, int],
    ) -> bool:
        """Store what does not clash; raise `WriteDiverged` (after that) for what does.

        A clash is another write at this version (the ledger of write ids says so) or another
        event at one of these seqs (same seq, other content): Redis lost writes MongoDB has.
        """
        doc = _to_doc(record)
        session_id = doc.pop("_id")
        version_clash = await self._written_by(record) is not None
        if not version_clash:
            result = await _guard(
                self._sessions.update_one({"_id": session_id, "version": guard}, {"$set": doc})
            )
            if result.matched_count == 0:
                exists = await _guard(self._sessions.find_one({"_id": session_id}, {"archive": 1}))
                if exists is None:
                    # An earlier delivery cut short may have added events after a delete.
                    await _guard(self._events.delete_many({"session_id": session_id}))
                    return False
                if exists.get("archive") is not None:
                    return True  # a late replay: the archive already holds all of it
            if context is not None:
                await _guard(
                    self._sessions.update_one(
                        {"_id": session_id, "context_version": {"$lt": context.version}},
                        {
                            "$set": {
                                "full_context": context.value,
                                "context_version": context.version,
                            }
                        },
                    )
                )
        clashing: list[TimelineEvent] = []
        if events:
            clashing = await self._insert_events(session_id, events)
            if await _guard(self._sessions.find_one({"_id": session_id}, {"_id": 1})) is None:
                # Deleted while we wrote: take back what we added, leave no orphans.
                await _guard(self._events.delete_many({"session_id": session_id}))
                return False
        if version_clash or clashing:
            stored = await self.get(session_id)
            last = await self.recent_events(session_id, 1)
            raise WriteDiverged(
                record,
                clashing,
                context,
                version_clash=version_clash,
                stored=stored,
                stored_seq=max(last[0].seq if last else 0, stored.timeline_seq if stored else 0),
            )
        return True

    async def _insert_events(
        self, session_id: str, events: list[TimelineEvent]
    ) -> list[TimelineEvent]:
        """Insert events; one already stored (same seq, same content) is done. Returns those
        whose seq MongoDB holds for another event."""
        try:
            await _guard(
                self._events.insert_many([_event_doc(session_id, e) for e in events], ordered=False)
            )
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            errors = exc.details.get("writeErrors", [])
            taken = [events[err["index"]] for err in errors]
            return await self._other_events(session_id, taken)
        return []

    async def _other_events(
        self, session_id: str, taken: list[TimelineEvent]
    ) -> list[TimelineEvent]:
        """Of `taken` (seqs MongoDB has), those MongoDB holds another event for."""
        cursor = self._events.find(
            {"session_id": session_id, "seq": {"$in": [e.seq for e in taken]}}
        )
        stored = {d["seq"]: _from_event_doc(d) for d in await _guard(cursor.to_list(None))}
        return [e for e in taken if e.seq in stored and not _same_event(stored[e.seq], e)]

    async def keep_conflict(self, diverged: WriteDiverged) -> bool:
        """Keep the write that diverged (what came in, what MongoDB held); False when it was
        kept before (its id names the write and the clash)."""
        record = diverged.record
        seqs = ",".join(str(e.seq) for e in diverged.events)
        key = f"{record.id}:{record.write_id}:v{int(diverged.version_clash)}:{seqs}"
        incoming = {
            "record": msgspec.to_builtins(record, builtin_types=(datetime,)),
            "events": msgspec.to_builtins(diverged.events, builtin_types=(datetime,)),
            "context": msgspec.to_builtins(diverged.context, builtin_types=(datetime,)),
        }
        stored = (
            msgspec.to_builtins(diverged.stored, builtin_types=(datetime,))
            if diverged.stored
            else None
        )
        doc = {
            "_id": key,
            "session_id": record.id,
            "at": utcnow(),
            "incoming": incoming,
            "stored": stored,
        }
        parts = _conflict_parts(doc)
        if parts:  # first: the conflict's own document says it is all there
            try:
                await _guard(self._conflicts.insert_many(parts, ordered=False))
            except BulkWriteError as exc:  # those a try cut short stored are done
                if not _only_duplicates(exc):
                    raise
        try:
            await _guard(self._conflicts.insert_one(doc))
        except DuplicateKeyError:
            return False
        return True

    async def mark_state(self, session_id: str, version: int, state: SessionState) -> None:
        await _guard(
            self._sessions.update_one(
                {"_id": session_id, "version": version, "archive": None},
                {"$set": {"state": state.value}},
            )
        )

    async def delete(self, session_id: str) -> None:
        await _guard(self._sessions.delete_one({"_id": session_id}))
        await _guard(self._events.delete_many({"session_id": session_id}))
        await _guard(self._writes.delete_many({"session_id": session_id}))
        await _guard(self._conflicts.delete_many({"session_id": session_id}))

    # -- the cold tier's side of MongoDB ---------------------------------------------------------

    async def stored(self, session_id: str) -> StoredSession | None:
        doc = await _guard(self._sessions.find_one({"_id": session_id}))
        if doc is None:
            return None
        archive = doc.get("archive")
        return StoredSession(
            record=_from_doc(doc),
            archive=msgspec.convert(archive, ArchiveRef) if archive else None,
            purge_pending=bool(doc.get("purge_pending")),
            cold_key=doc.get("cold_key"),
        )

    async def export(self, session_id: str) -> SessionArchive | None:
        """The full record of a session that is not archived: document, context, events."""
        doc = await _guard(self._sessions.find_one({"_id": session_id, "archive": None}))
        if doc is None:
            return None
        context = ContextUpdate(
            version=doc.get("context_version", 0), value=doc.get("full_context", {})
        )
        events = await self.all_events(session_id)
        return SessionArchive(record=_from_doc(doc), context=context, events=events)

    async def to_stub(self, record: SessionRecord, ref: ArchiveRef) -> bool:
        """Replace the full document by a stub, unless it moved past `record.version`."""
        stub = {
            **_to_doc(record),
            "state": SessionState.ARCHIVED.value,
            "participants": {},
            "work_in_progress": {},
            "context_summary": {},
            "archive": msgspec.to_builtins(ref, builtin_types=(datetime,)),
            "purge_pending": True,
            "cold_key": ref.key,
        }
        result = await _guard(
            self._sessions.replace_one(
                {"_id": record.id, "version": record.version, "archive": None}, stub
            )
        )
        if result.matched_count:
            return True
        # Nothing matched: the session moved on, or this very stub is there already (a retry
        # after a lost reply). Only the second is a success.
        current = await _guard(
            self._sessions.find_one({"_id": record.id}, {"archive.sha256": 1, "version": 1})
        )
        archive = (current or {}).get("archive") or {}
        return bool(
            current
            and current.get("version") == record.version
            and archive.get("sha256") == ref.sha256
        )

    async def purge_events(self, session_id: str) -> None:
        await _guard(self._events.delete_many({"session_id": session_id}))

    async def purged(self, session_id: str, ref: ArchiveRef) -> None:
        await _guard(
            self._sessions.update_one(
                {"_id": session_id, "archive.sha256": ref.sha256}, {"$unset": {"purge_pending": ""}}
            )
        )

    async def insert_events(self, session_id: str, events: list[TimelineEvent]) -> None:
        """Insert the events not stored yet (a restore usually finds all or none of them)."""
        if not events:
            return
        cursor = self._events.find({"session_id": session_id}, {"seq": 1, "_id": 0})
        present = {d["seq"] for d in await _guard(cursor.to_list(None))}
        missing = [e for e in events if e.seq not in present]
        if missing:
            await self._insert_events(session_id, missing)

    async def restore(self, archive: SessionArchive, ref: ArchiveRef) -> bool:
        """Put the full document back in place of its stub; False if the stub is gone.

        Events go in before the document (so a restored document is never short of them) and
        again after it: an archive finishing its events delete meanwhile cannot leave a
        restored session without its timeline.
        """
        record = archive.record
        await self.insert_events(record.id, archive.events)
        doc = {
            **_to_doc(record),
            "full_context": archive.context.value,
            "context_version": archive.context.version,
            "cold_key": ref.key,
        }
        stub = {
            "_id": record.id,
            "state": SessionState.ARCHIVED.value,
            "version": record.version,
            "archive.sha256": ref.sha256,
        }
        result = await _guard(self._sessions.replace_one(stub, doc))
        current = await _guard(self._sessions.find_one({"_id": record.id}, {"archive": 1}))
        if current is None:  # deleted meanwhile: leave no orphan events
            await self.purge_events(record.id)
            return False
        if result.matched_count:
            await self.insert_events(record.id, archive.events)
        return current.get("archive") is None

    async def archive_candidates(self, idle_since: datetime, limit: int) -> list[str]:
        """Sessions at rest since before `idle_since`, and stubs an archive left unfinished."""
        query = {
            "$or": [
                {"state": {"$in": ["dormant", "active"]}, "last_active": {"$lt": idle_since}},
                {"state": "archived", "purge_pending": True},
            ]
        }
        cursor = self._sessions.find(query, {"_id": 1}).sort("last_active", ASCENDING)
        return [d["_id"] for d in await _guard(cursor.limit(limit).to_list(limit))]

    async def count_owned(self, owner_id: str, limit: int, other_than: str | None = None) -> int:
        """How many sessions `owner_id` owns but `other_than`, counted up to `limit` (the
        owner_id index)."""
        query: dict[str, Any] = {"owner_id": owner_id}
        if other_than is not None:
            query["_id"] = {"$ne": other_than}
        count: int = await _guard(self._sessions.count_documents(query, limit=limit))
        return count

    async def list_for(
        self,
        principal_sub: str | None,
        state: SessionState | None,
        limit: int,
        after: ListAfter | None,
        *,
        order: str = "id",
    ) -> Page:
        """A page in id order, or most recently active first (`order="recent"`, ties by id)."""
        query: dict[str, Any] = {}
        conditions: list[dict[str, Any]] = []
        if principal_sub is not None:
            conditions.append({"$or": [{"owner_id": principal_sub}, {"acl": principal_sub}]})
        if state is not None:
            query["state"] = state.value
        if order == "recent":
            sort = [("last_active", DESCENDING), ("_id", DESCENDING)]
            if after is not None:
                conditions.append(
                    {
                        "$or": [
                            {"last_active": {"$lt": after.last_active}},
                            {"last_active": after.last_active, "_id": {"$lt": after.id}},
                        ]
                    }
                )
        else:
            sort = [("_id", ASCENDING)]
            if after is not None:
                query["_id"] = {"$gt": after.id}
        if conditions:
            query["$and"] = conditions
        cursor = self._sessions.find(query).sort(sort).limit(limit + 1)
        docs = await _guard(cursor.to_list(limit + 1))
        items = [_from_doc(d) for d in docs[:limit]]
        return Page(items=items, next_cursor=items[-1].id if len(docs) > limit else None)


async def _guard(awaitable: Awaitable[T], *, retryable: bool = True) -> T:
    """An error every write would get now (out of reach, too slow, an election, credentials,
    write concern, disk or quota) becomes `BackendUnavailable`: the caller retries later and
    the write-behind keeps its entry. Only an error about the request itself passes through.
    Only reachability and time-outs are retried at once: a refused credential is not."""
    try:
        return await awaitable
    except _TRANSIENT as exc:
        raise BackendUnavailable("mongodb", describe(exc), retryable=retryable) from exc
    except PyMongoError as exc:
        if not is_outage(exc):
            raise
        raise BackendUnavailable("mongodb", describe(exc), retryable=False) from exc


def mongo_client(settings: Settings) -> Any:
    """Motor for a real server; mongomock-motor for `mongomock://` (dev and tests)."""
    if settings.mongodb_in_memory:
        from mongomock_motor import AsyncMongoMockClient

        return AsyncMongoMockClient(tz_aware=True)
    options: dict[str, Any] = {
        "tz_aware": True,
        "serverSelectionTimeoutMS": settings.mongodb_timeout_ms,
        "connectTimeoutMS": settings.mongodb_timeout_ms,
        "socketTimeoutMS": settings.mongodb_timeout_ms * 5,
    }
    if settings.mongodb_ca_file:
        options["tlsCAFile"] = settings.mongodb_ca_file
    return AsyncIOMotorClient(settings.mongodb_uri, **options)


async def open_warm_store(settings: Settings) -> AsyncIterator[MongoWarmStore]:
    """Container resource: connect, create the indexes, and close at shutdown."""
    client = mongo_client(settings)
    try:
        await init_beanie(
            database=client[settings.mongodb_db],
            document_models=[SessionDocument, EventDocument, WriteDocument, ConflictDocument],
        )
        yield MongoWarmStore(client, settings.mongodb_db, batch_inserts=settings.mongodb_batch)
    finally:
        client.close()

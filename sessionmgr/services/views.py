"""What the use cases answer with, and how a stored record becomes a `Session`."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

import msgspec

from sessionmgr.domain.leases import lapse_time
from sessionmgr.domain.model import (
    ArchiveRef,
    Participant,
    Session,
    SessionRecord,
    SessionState,
    TimelineEvent,
)


class AppendResult(msgspec.Struct, frozen=True):
    version: int
    appended: int
    first_seq: int
    last_seq: int


class LeaseInfo(msgspec.Struct, frozen=True):
    mad_name: str
    expires_at: datetime
    token: int  # the fencing token of the grant this renewal extends (it does not change)


class SessionSummary(msgspec.Struct, frozen=True):
    id: str
    version: int
    state: SessionState
    owner_id: str
    created_at: datetime
    last_active: datetime


class ListOrder(StrEnum):
    """The orders `GET /v1/sessions` offers; each page continues from a keyset cursor."""

    ID = "id"
    RECENT = "recent"


class ArchivedSession(msgspec.Struct, kw_only=True):
    """What an archive answers: the stub MongoDB keeps, where the body went, and how to get it.

    No empty `work_in_progress` or `participants` that would read like data lost: the body is
    in S3 (`archive`), and any read of the session brings it back (`restore`).
    """

    id: str
    version: int
    state: SessionState
    owner_id: str
    acl: list[str]
    created_at: datetime
    last_active: datetime
    archive: ArchiveRef
    body_archived: bool = True
    restore: str = ""


class SessionPage(msgspec.Struct, frozen=True):
    items: list[SessionSummary]
    next_cursor: str | None


def to_session(
    record: SessionRecord,
    recent: list[TimelineEvent],
    lease_ttl_ms: dict[str, int],
    now: datetime,
    *,
    state: SessionState | None = None,
) -> Session:
    """The API view of a record; a participant is active while its lease key lives."""
    participants = {
        mad: _participant(p, lease_ttl_ms.get(mad), now) for mad, p in record.participants.items()
    }
    return Session(
        id=record.id,
        version=record.version,
        state=state or record.state,
        owner_id=record.owner_id,
        acl=list(record.acl),
        created_at=record.created_at,
        last_active=record.last_active,
        participants=participants,
        work_in_progress=record.work_in_progress,
        context_summary=record.context_summary,
        recent_timeline=list(recent),
    )


def _participant(p: Participant, ttl_ms: int | None, now: datetime) -> Participant:
    if ttl_ms is None:  # lapsed: the recorded expiry is when it really ended
        ended = lapse_time(p, now)
        return Participant(
            joined_at=p.joined_at,
            lease_expires_at=ended,
            active=False,
            token=p.token,
            lapsed_at=ended,
        )
    expires = now + timedelta(milliseconds=ttl_ms)
    # Whole seconds: read twice, a live lease shows the same expiry, and so the same ETag.
    expires = expires.replace(microsecond=0)
    return Participant(joined_at=p.joined_at, lease_expires_at=expires, active=True, token=p.token)


def archived(record: SessionRecord, ref: ArchiveRef) -> ArchivedSession:
    return ArchivedSession(
        id=record.id,
        version=record.version,
        state=record.state,
        owner_id=record.owner_id,
        acl=list(record.acl),
        created_at=record.created_at,
        last_active=record.last_active,
        archive=ref,
        restore=f"GET /v1/sessions/{record.id} brings the body back from the archive",
    )


def summary(record: SessionRecord) -> SessionSummary:
    return SessionSummary(
        id=record.id,
        version=record.version,
        state=record.state,
        owner_id=record.owner_id,
        created_at=record.created_at,
        last_active=record.last_active,
    )

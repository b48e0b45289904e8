"""What the API answers, as msgspec structs.

Unknown members are ignored, so a newer server that adds a field does not break an older
client; `state` and `kind` stay plain strings for the same reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class TimelineEvent(msgspec.Struct, frozen=True):
    seq: int
    at: datetime
    actor: str
    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Participant(msgspec.Struct, frozen=True):
    joined_at: datetime
    lease_expires_at: datetime
    active: bool = False
    token: int = 0
    lapsed_at: datetime | None = None


class ArchiveRef(msgspec.Struct, frozen=True):
    key: str
    sha256: str
    size: int
    archived_at: datetime


class Session(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    version: int
    state: str
    owner_id: str
    created_at: datetime
    last_active: datetime
    acl: list[str] = msgspec.field(default_factory=list)
    participants: dict[str, Participant] = msgspec.field(default_factory=dict)
    work_in_progress: dict[str, Any] = msgspec.field(default_factory=dict)
    context_summary: dict[str, Any] = msgspec.field(default_factory=dict)
    recent_timeline: list[TimelineEvent] = msgspec.field(default_factory=list)
    full_context: dict[str, Any] | None = None
    full_timeline: list[TimelineEvent] | None = None
    full_timeline_next_after_seq: int | None = None
    archive: ArchiveRef | None = None


class ArchivedSession(msgspec.Struct, frozen=True, kw_only=True):
    """The stub an archive answers: the body is in S3, a read brings it back."""

    id: str
    version: int
    state: str
    owner_id: str
    created_at: datetime
    last_active: datetime
    archive: ArchiveRef
    acl: list[str] = msgspec.field(default_factory=list)
    body_archived: bool = True
    restore: str = ""


class SessionSummary(msgspec.Struct, frozen=True):
    id: str
    version: int
    state: str
    owner_id: str
    created_at: datetime
    last_active: datetime


class Page(msgspec.Struct, frozen=True):
    """One page of `GET /v1/sessions`; `next_cursor` continues, None at the end."""

    items: list[SessionSummary]
    next_cursor: str | None = None


class TimelinePage(msgspec.Struct, frozen=True):
    """One page of a timeline, oldest first; `next_after_seq` continues, None at the end."""

    items: list[TimelineEvent]
    next_after_seq: int | None = None


class AppendResult(msgspec.Struct, frozen=True):
    version: int
    appended: int
    first_seq: int
    last_seq: int


class LeaseInfo(msgspec.Struct, frozen=True):
    mad_name: str
    expires_at: datetime
    token: int


class NewEvent(msgspec.Struct, frozen=True):
    """A timeline event as a client sends it; the server adds seq, at and actor."""

    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """An RFC 9457 problem as sessionmgr answers it (docs/problems.md)."""

    type: str = "about:blank"
    title: str = ""
    status: int = 0
    detail: str = ""
    instance: str = ""
    current_version: int | None = None
    backend: str | None = None
    limit: str | None = None
    quota: int | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)

    @property
    def slug(self) -> str:
        """`version-conflict` of `/problems#version-conflict` ('' for other types)."""
        _, _, slug = self.type.partition("/problems#")
        return slug


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One event of the change feed.

    `id` is the opaque feed position (send it back as `since` to resume), `kind` one of
    patched, appended, joined, left, lapsed, suspended, resumed, archived, deleted or reset,
    and `data` the whole JSON the server sent (at least session_id, version and kind).
    """

    id: str | None
    kind: str
    session_id: str
    version: int
    data: dict[str, Any] = msgspec.field(default_factory=dict)

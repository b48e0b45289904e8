"""The session and its parts, as msgspec structs shared by the API and the hot tier."""

from __future__ import annotations

import os
import random
import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec


class SessionState(StrEnum):
    ACTIVE = "active"
    DORMANT = "dormant"
    ARCHIVED = "archived"


class Principal(msgspec.Struct, frozen=True):
    """The authenticated caller: `sub` of the token and its roles."""

    sub: str
    roles: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def may_act_for_others(self) -> bool:
        return bool(self.roles & {"admin", "service"})


class TimelineEvent(msgspec.Struct, frozen=True):
    seq: int
    at: datetime
    actor: str
    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Participant(msgspec.Struct):
    """A MAD in a session. `token` is the fencing token of its latest lease grant;
    `lapsed_at` (answers only) says when a lease that is no longer alive ended."""

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


class Session(msgspec.Struct, kw_only=True):
    """A session as every tier agrees on it; `full_*` are filled only on request."""

    id: str
    version: int
    state: SessionState
    owner_id: str
    acl: list[str] = msgspec.field(default_factory=list)
    created_at: datetime
    last_active: datetime
    participants: dict[str, Participant] = msgspec.field(default_factory=dict)
    work_in_progress: dict[str, Any] = msgspec.field(default_factory=dict)
    context_summary: dict[str, Any] = msgspec.field(default_factory=dict)
    recent_timeline: list[TimelineEvent] = msgspec.field(default_factory=list)
    full_context: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    full_timeline: list[TimelineEvent] | msgspec.UnsetType = msgspec.UNSET
    archive: ArchiveRef | None = None
    # With `full_timeline`: null when it is whole, else the seq to read on from with
    # GET .../timeline?after_seq= (it holds at most SESSIONMGR_FULL_TIMELINE_MAX events).
    full_timeline_next_after_seq: int | msgspec.UnsetType | None = msgspec.UNSET


class SessionRecord(msgspec.Struct, kw_only=True):
    """A session's record as both Redis and MongoDB hold it, without its large parts.

    `timeline_seq` is the last sequence number handed out, `lease_grants` the last fencing
    token; the events and `full_context` travel apart (see `ContextUpdate`).
    """

    id: str
    version: int
    state: SessionState
    owner_id: str
    acl: list[str]
    created_at: datetime
    last_active: datetime
    participants: dict[str, Participant]
    work_in_progress: dict[str, Any]
    context_summary: dict[str, Any]
    timeline_seq: int = 0
    lease_grants: int = 0  # the last fencing token handed out: tokens are never reused
    # Names the write that made this version, beyond the version itself: after Redis lost
    # writes and reused a version, MongoDB tells the same write delivered twice from another.
    write_id: str = ""


class ContextUpdate(msgspec.Struct, frozen=True):
    """`full_context` as set at `version`. It lives in MongoDB only and travels apart from the
    record, so a session's hot copy stays small (DESIGN §3)."""

    version: int
    value: dict[str, Any]


MUTABLE_FIELDS = frozenset({"work_in_progress", "context_summary", "full_context"})


def utcnow() -> datetime:
    """Now, at the millisecond precision MongoDB keeps, so every tier reads the same instant.

    From the whole milliseconds of `time.time_ns()`: a third of the CPU of `datetime.now`
    and `replace` (an append asks twice). The float of `ms / 1000` is within half a
    microsecond of the instant until 2106 (2**32 s), so `fromtimestamp`, which rounds to the
    microsecond, gives that millisecond exactly."""
    return datetime.fromtimestamp(time.time_ns() // 1_000_000 / 1000, UTC)


def new_session_id() -> str:
    """A random 128-bit id, hex-encoded: never guessable, never sequential."""
    return secrets.token_hex(16)


def new_write_id() -> str:
    """Names one write beyond its version (DESIGN §2): unique, never a secret."""
    return f"{unique_64():016x}"


# Stamps that only have to differ from every other one, never to be unguessable: a write's
# id, a hash's `rev` (the commit script's compare-and-set). A generator of their own, seeded
# by the OS, and again in a forked child, so no two processes draw the same sequence, and no
# `random.seed(n)` elsewhere in the process (a library, a test plugin) touches it. `secrets`
# would make a system call for each: about 4 % of an append's CPU (`bench.profile`).
_stamps = random.Random()  # noqa: S311 (see above)
os.register_at_fork(after_in_child=_stamps.seed)


def unique_64() -> int:
    """64 random bits for a stamp (above)."""
    return _stamps.getrandbits(64)


def mad_principal(mad_name: str) -> str:
    return f"mad:{mad_name}"


class NewEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A timeline event as a client sends it; the server adds seq, at and actor."""

    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)

"""Request bodies: msgspec structs that refuse unknown fields."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sessionmgr.domain.model import NewEvent

Version = Annotated[int, msgspec.Meta(ge=1, le=2**62)]


class CreateSessionBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    owner_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    work_in_progress: dict[str, Any] = msgspec.field(default_factory=dict)
    context_summary: dict[str, Any] = msgspec.field(default_factory=dict)


class PatchBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`patch` names only mutable fields; `expected_version` or an If-Match header is required."""

    patch: dict[str, Any]
    expected_version: Version | None = None


class AppendBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    events: list[NewEvent]
    expected_version: Version | None = None


class ParticipantBody(msgspec.Struct, forbid_unknown_fields=True):
    mad_name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

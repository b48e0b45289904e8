"""Quotas (docs/security.md): how many sessions an owner, participants a session and events a
timeline may have. Roles admin and service get `quota_privileged_factor` times each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sessionmgr.domain.errors import QuotaExceeded
from sessionmgr.domain.model import Principal, SessionRecord
from sessionmgr.services.ports import WarmStore

if TYPE_CHECKING:
    from sessionmgr.services.sessions import Limits


def quota(limits: Limits, principal: Principal, base: int) -> int:
    """A quota as it applies to `principal`."""
    return base * limits.quota_privileged_factor if principal.may_act_for_others else base


async def check_owner(
    limits: Limits,
    warm: WarmStore,
    principal: Principal,
    owner: str,
    other_than: str | None = None,
) -> None:
    """Before a create: counted in MongoDB, where every session of every state is.

    Creates racing each other may pass the quota by the number in flight. `other_than` is a
    session the count leaves out: a keyed create's own id, stored by an earlier attempt.
    """
    cap = quota(limits, principal, limits.max_sessions_per_owner)
    if await warm.count_owned(owner, cap, other_than) >= cap:
        raise QuotaExceeded(f"{owner} owns too many sessions", "max_sessions_per_owner", cap)


def check_participants(limits: Limits, principal: Principal, record: SessionRecord) -> None:
    """Before a participant that is not there yet joins `record`."""
    cap = quota(limits, principal, limits.max_participants)
    if len(record.participants) >= cap:
        what = f"the session has {len(record.participants)} participants"
        raise QuotaExceeded(what, "max_participants", cap)


def check_events(limits: Limits, principal: Principal, record: SessionRecord, adding: int) -> None:
    """Before `adding` events join `record`'s timeline (its last seq counts its events)."""
    cap = quota(limits, principal, limits.max_timeline_events)
    if record.timeline_seq + adding > cap:
        raise QuotaExceeded(
            f"the timeline holds {record.timeline_seq} events", "max_timeline_events", cap
        )

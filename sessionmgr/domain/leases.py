"""Leases with authority: who needs one to write, fencing tokens, and reaping lapsed MADs.

A `mad:<name>` principal changes a session's data only while its lease is alive; the owner,
`admin` and principals that are not MADs are not bound by leases. Each grant (a join, or a
rejoin after the lease lapsed) takes the session's next fencing token; a renewal keeps it.
A participant whose lease lapsed more than the grace period ago is reaped: it leaves
`participants` and the ACL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import msgspec

from sessionmgr.domain.errors import AccessDenied, Fenced, LeaseExpired
from sessionmgr.domain.model import Participant, Principal, SessionRecord, mad_principal

MAD_PREFIX = "mad:"


def mad_of(principal: Principal) -> str | None:
    """The MAD name of a `mad:<name>` principal, else None."""
    return principal.sub[len(MAD_PREFIX) :] if principal.sub.startswith(MAD_PREFIX) else None


def bound_mad(principal: Principal, owner_id: str) -> str | None:
    """The MAD whose lease a write by `principal` needs; None when no lease applies."""
    if principal.is_admin or principal.sub == owner_id:
        return None
    return mad_of(principal)


def may_manage(principal: Principal, owner_id: str, role: str | None) -> bool:
    """Adding and removing other participants, and suspending: owner, admin or `role`."""
    return (
        principal.is_admin
        or principal.sub == owner_id
        or (role is not None and role in principal.roles)
    )


def require_manager(principal: Principal, owner_id: str, role: str | None, what: str) -> None:
    if not may_manage(principal, owner_id, role):
        who = f"the owner, an admin or role {role}" if role else "the owner or an admin"
        raise AccessDenied(f"only {who} may {what}")


def require_self_or_manager(
    principal: Principal, record: SessionRecord, mad_name: str, role: str | None, what: str
) -> None:
    """A MAD may act on its own participation; anyone else must manage participants."""
    if mad_of(principal) == mad_name:
        return
    require_manager(principal, record.owner_id, role, what)


def require_live_lease(
    principal: Principal,
    record: SessionRecord,
    live: Mapping[str, int],
    token: int | None,
) -> None:
    """Refuse a write by a MAD without a live lease, or with a token older than its newest."""
    mad = bound_mad(principal, record.owner_id)
    if mad is None:
        return
    participant = record.participants.get(mad)
    if participant is None or mad not in live:
        raise LeaseExpired(record.id, mad)
    check_token(record.id, mad, participant, token)


def check_token(session_id: str, mad: str, participant: Participant, token: int | None) -> None:
    """Without a token a write is accepted (older clients); a token must be the newest grant."""
    if token is not None and token != participant.token:
        raise Fenced(session_id, mad, token)


def lapse_time(participant: Participant, now: datetime) -> datetime:
    """When a lease that is not alive ended: its recorded expiry, never later than now."""
    return min(participant.lease_expires_at, now)


def reapable(
    record: SessionRecord, live: Mapping[str, int], now: datetime, grace: timedelta
) -> list[str]:
    """Participants whose lease lapsed more than `grace` ago."""
    return [
        mad
        for mad, p in record.participants.items()
        if mad not in live and lapse_time(p, now) + grace <= now
    ]


def without(record: SessionRecord, mads: Iterable[str]) -> SessionRecord:
    """The record with these MADs gone from `participants` and the ACL."""
    gone = set(mads)
    if not gone:
        return record
    principals = {mad_principal(m) for m in gone}
    return msgspec.structs.replace(
        record,
        participants={m: p for m, p in record.participants.items() if m not in gone},
        acl=[a for a in record.acl if a not in principals],
    )


def ended(participants: Mapping[str, Participant], now: datetime) -> dict[str, Participant]:
    """Every lease ended at `now` at the latest (a suspend drops the lease keys)."""
    return {
        mad: msgspec.structs.replace(p, lease_expires_at=min(p.lease_expires_at, now))
        for mad, p in participants.items()
    }


def granted(
    record: SessionRecord, mad: str, now: datetime, ttl: timedelta
) -> tuple[SessionRecord, Participant]:
    """A new lease grant: the session's next fencing token, recorded in the same write."""
    token = record.lease_grants + 1
    participant = Participant(joined_at=now, lease_expires_at=now + ttl, active=True, token=token)
    member = mad_principal(mad)
    acl = record.acl if member in record.acl else [*record.acl, member]
    new = msgspec.structs.replace(
        record,
        participants={**record.participants, mad: participant},
        acl=acl,
        lease_grants=token,
    )
    return new, participant


def renewed(record: SessionRecord, mad: str, now: datetime, ttl: timedelta) -> SessionRecord:
    """The lease's new end, recorded so that a lapse later reports when it really ended."""
    participant = msgspec.structs.replace(record.participants[mad], lease_expires_at=now + ttl)
    return msgspec.structs.replace(record, participants={**record.participants, mad: participant})

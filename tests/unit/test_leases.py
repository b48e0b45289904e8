"""Leases with authority, fencing tokens, reaping and who manages participants (issue 12/17),
on SessionService over the in-memory fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sessionmgr.domain.errors import (
    AccessDenied,
    Fenced,
    LeaseExpired,
    SessionDormant,
    SessionNotFound,
)
from sessionmgr.domain.model import NewEvent, Session, utcnow
from sessionmgr.services.sessions import Limits
from tests.unit.factories import principal
from tests.unit.fakes import World, world

ALICE = principal("alice")
ROOT = principal("root", "admin")
PLANNER = principal("mad:planner")
CODER = principal("mad:coder")
CONDUCTOR = principal("mad:conductor", "coordinator")


@pytest.fixture
def w() -> World:
    return world(Limits(participants_role="coordinator"))


async def team(w: World, *mads: str) -> Session:
    session = await w.service.create(ALICE)
    for mad in mads:
        session = await w.service.add_participant(ALICE, session.id, mad)
    return session


def lapse(w: World, sid: str, mad: str) -> None:
    """The lease key expires (Redis drops it), nothing else changes."""
    del w.hot.leases[(sid, mad)]


async def note(w: World, who: Any, sid: str, token: int | None = None) -> int:
    result = await w.service.append(
        who, sid, [NewEvent(kind="note", data={"by": who.sub})], lease_token=token
    )
    return result.version


# -- writes need a live lease ---------------------------------------------------------------


async def test_a_mad_writes_while_its_lease_lives_and_not_after(w: World) -> None:
    s = await team(w, "planner")
    await note(w, PLANNER, s.id)
    lapse(w, s.id, "planner")

    with pytest.raises(LeaseExpired) as caught:
        await note(w, PLANNER, s.id)
    with pytest.raises(LeaseExpired):
        await w.service.update(
            PLANNER, s.id, expected_version=3, patch={"work_in_progress": {"x": 1}}
        )

    assert f"POST /v1/sessions/{s.id}/participants" in str(caught.value)  # how to rejoin
    assert (await w.service.get(ALICE, s.id)).version == 3
    assert (await w.service.get(PLANNER, s.id)).participants["planner"].active is False  # reads


@pytest.mark.parametrize("who", [ALICE, ROOT])
async def test_the_owner_and_admin_need_no_lease(w: World, who: Any) -> None:
    s = await team(w, "planner")
    lapse(w, s.id, "planner")
    assert await note(w, who, s.id) == 3


async def test_a_session_owned_by_a_mad_is_written_by_it_without_a_lease(w: World) -> None:
    owned = await w.service.create(PLANNER)
    assert await note(w, PLANNER, owned.id) == 2


async def test_a_lapsed_mad_writing_a_dormant_session_does_not_wake_it(w: World) -> None:
    s = await team(w, "planner")
    await w.service.suspend(ALICE, s.id)
    with pytest.raises(LeaseExpired):
        await note(w, PLANNER, s.id)
    assert not w.hot.is_hot(s.id)


# -- fencing tokens -------------------------------------------------------------------------


async def test_each_grant_takes_a_new_token_and_renewals_keep_it(w: World) -> None:
    s = await team(w, "planner", "coder")
    assert [p.token for p in s.participants.values()] == [1, 2]

    again = await w.service.add_participant(ALICE, s.id, "planner")  # live: a renewal
    renewed = await w.service.renew_lease(PLANNER, s.id, "planner")
    assert again.participants["planner"].token == renewed.token == 1
    assert again.version == s.version

    lapse(w, s.id, "planner")
    rejoined = await w.service.add_participant(PLANNER, s.id, "planner")  # a MAD may rejoin
    assert rejoined.participants["planner"].token == 3
    assert rejoined.participants["planner"].active
    assert rejoined.version == s.version + 1


async def test_an_older_token_is_fenced_after_a_rejoin(w: World) -> None:
    s = await team(w, "planner")
    await note(w, PLANNER, s.id, token=1)
    lapse(w, s.id, "planner")  # the first instance pauses; a second one rejoins
    token = (await w.service.add_participant(PLANNER, s.id, "planner")).participants["planner"]
    assert token.token == 2

    with pytest.raises(Fenced):
        await note(w, PLANNER, s.id, token=1)
    with pytest.raises(Fenced):
        await w.service.renew_lease(PLANNER, s.id, "planner", lease_token=1)
    with pytest.raises(Fenced):
        await w.service.remove_participant(PLANNER, s.id, "planner", lease_token=1)
    with pytest.raises(Fenced):  # a token never granted is no better
        await note(w, PLANNER, s.id, token=7)

    version = (await w.service.get(ALICE, s.id)).version
    assert await note(w, PLANNER, s.id, token=2) == version + 1
    assert await note(w, PLANNER, s.id) == version + 2  # no token: the live lease decides


async def test_tokens_are_never_reused_after_a_removal_or_a_suspend(w: World) -> None:
    s = await team(w, "planner")
    await w.service.remove_participant(ALICE, s.id, "planner")
    await w.service.suspend(ALICE, s.id)
    await w.service.resume(ALICE, s.id)
    await w.deliver_outbox()

    back = await w.service.add_participant(ALICE, s.id, "planner")
    assert back.participants["planner"].token == 2
    assert (await w.warm.get(s.id)) is not None


# -- renewals and dormant sessions ----------------------------------------------------------


async def test_a_renewal_records_the_new_expiry_without_a_version_or_an_outbox_entry() -> None:
    w = world(Limits(lease_ttl_s=1))
    s = await team(w, "planner")
    await asyncio.sleep(0.4)
    outbox = len(w.hot.outbox)
    lease = await w.service.renew_lease(PLANNER, s.id, "planner")
    assert len(w.hot.outbox) == outbox
    assert (await w.service.get(ALICE, s.id)).version == s.version

    await asyncio.sleep(1.1)  # the renewed lease lapses on its own
    seen = (await w.service.get(ALICE, s.id)).participants["planner"]
    assert seen.active is False
    assert seen.lease_expires_at == seen.lapsed_at == lease.expires_at  # not the join's


async def test_a_lapsed_lease_is_rejoined_not_renewed(w: World) -> None:
    s = await team(w, "planner")
    lapse(w, s.id, "planner")
    for who in (PLANNER, ALICE):
        with pytest.raises(LeaseExpired):
            await w.service.renew_lease(who, s.id, "planner")
    assert w.hot.lease_left_ms(s.id, "planner") == -2


@pytest.mark.parametrize("action", ["renew", "join", "rejoin"])
async def test_a_dormant_session_is_not_woken_for_a_lease(w: World, action: str) -> None:
    s = await team(w, "planner")
    await w.service.suspend(ALICE, s.id)
    calls = {
        "renew": lambda: w.service.renew_lease(PLANNER, s.id, "planner"),
        "join": lambda: w.service.add_participant(ALICE, s.id, "coder"),
        "rejoin": lambda: w.service.add_participant(PLANNER, s.id, "planner"),
    }
    with pytest.raises(SessionDormant):
        await calls[action]()
    assert not w.hot.is_hot(s.id)

    await w.service.resume(PLANNER, s.id)  # a participant may resume, then rejoin
    rejoined = await w.service.add_participant(PLANNER, s.id, "planner")
    assert rejoined.participants["planner"].active and rejoined.participants["planner"].token == 2


async def test_a_suspend_ends_every_lease_at_its_time(w: World) -> None:
    s = await team(w, "planner")
    before = utcnow()
    dormant = await w.service.suspend(ALICE, s.id)
    seen = dormant.participants["planner"]
    assert seen.active is False
    assert seen.lapsed_at is not None and before <= seen.lapsed_at <= utcnow()
    assert (await w.service.get(ALICE, s.id)).participants["planner"] == seen


# -- reaping --------------------------------------------------------------------------------


async def test_a_lapsed_participant_is_reaped_after_the_grace_period() -> None:
    w = world(Limits(lease_ttl_s=1, lease_grace_s=1))
    s = await team(w, "planner", "coder")
    await asyncio.sleep(1.1)  # both leases lapse
    lapsed = await w.service.get(ALICE, s.id)
    assert {m: p.active for m, p in lapsed.participants.items()} == {
        "planner": False,
        "coder": False,
    }
    assert lapsed.acl == ["mad:planner", "mad:coder"]  # inside the grace period
    assert (await w.service.get(PLANNER, s.id)).id == s.id

    await asyncio.sleep(1.0)
    reaped = await w.service.get(ALICE, s.id)
    assert (reaped.participants, reaped.acl) == ({}, [])  # visible on read at once
    with pytest.raises(AccessDenied):
        await w.service.get(PLANNER, s.id)
    with pytest.raises(AccessDenied):  # a renewal does not bring it back
        await w.service.renew_lease(PLANNER, s.id, "planner")
    with pytest.raises(AccessDenied):
        await w.service.add_participant(PLANNER, s.id, "planner")

    await note(w, ALICE, s.id)  # the next write stores the reaping
    await w.deliver_outbox()
    stored = await w.warm.get(s.id)
    assert stored is not None
    assert (stored.participants, stored.acl) == ({}, [])


async def test_a_removal_is_immediate_and_a_removed_mad_cannot_renew(w: World) -> None:
    s = await team(w, "planner")
    await w.service.remove_participant(ALICE, s.id, "planner")
    with pytest.raises(AccessDenied):
        await w.service.renew_lease(PLANNER, s.id, "planner")
    with pytest.raises(SessionNotFound):
        await w.service.remove_participant(ALICE, s.id, "planner")
    assert w.hot.lease_left_ms(s.id, "planner") == -2


# -- who manages participants ---------------------------------------------------------------


async def test_a_mad_cannot_add_or_remove_others_or_suspend(w: World) -> None:
    s = await team(w, "planner", "coder")
    with pytest.raises(AccessDenied):
        await w.service.add_participant(PLANNER, s.id, "intruder")
    with pytest.raises(AccessDenied):
        await w.service.remove_participant(PLANNER, s.id, "coder")
    with pytest.raises(AccessDenied):
        await w.service.renew_lease(PLANNER, s.id, "coder")
    with pytest.raises(AccessDenied):
        await w.service.suspend(PLANNER, s.id)
    after = await w.service.get(ALICE, s.id)
    assert (after.version, after.acl, after.state) == (s.version, s.acl, "active")


async def test_a_mad_may_leave(w: World) -> None:
    s = await team(w, "planner", "coder")
    await w.service.remove_participant(PLANNER, s.id, "planner", lease_token=1)
    assert (await w.service.get(ALICE, s.id)).acl == ["mad:coder"]


async def test_the_participants_role_manages_like_the_owner(w: World) -> None:
    s = await team(w, "conductor", "coder")
    joined = await w.service.add_participant(CONDUCTOR, s.id, "critic")
    assert "mad:critic" in joined.acl
    await w.service.remove_participant(CONDUCTOR, s.id, "coder")
    dormant = await w.service.suspend(CONDUCTOR, s.id)
    assert dormant.acl == ["mad:conductor", "mad:critic"] and dormant.state == "dormant"


async def test_without_the_setting_no_role_manages(w: World) -> None:
    plain = world(Limits())
    s = await team(plain, "conductor")
    with pytest.raises(AccessDenied):
        await plain.service.add_participant(CONDUCTOR, s.id, "critic")

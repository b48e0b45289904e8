"""Quotas on sessions per owner, participants and timeline events: a 403 `quota-exceeded`
that names its limit; roles admin and service get `quota_privileged_factor` times each."""

from __future__ import annotations

import pytest

from sessionmgr.domain.errors import QuotaExceeded
from sessionmgr.domain.model import NewEvent
from sessionmgr.services import quotas
from sessionmgr.services.ports import Idempotency
from sessionmgr.services.sessions import Limits
from tests.unit.factories import principal
from tests.unit.fakes import World, world

ALICE = principal("alice")
SERVICE = principal("svc", "service")
LIMITS = Limits(
    max_sessions_per_owner=2,
    max_participants=2,
    max_timeline_events=5,
    quota_privileged_factor=3,
    max_events_per_append=10,
)


@pytest.fixture
def w() -> World:
    return world(LIMITS)


def events(n: int) -> list[NewEvent]:
    return [NewEvent(kind="note", data={"i": i}) for i in range(n)]


async def test_an_owner_past_the_session_quota_gets_quota_exceeded(w: World) -> None:
    for _ in range(2):
        await w.service.create(ALICE)
    with pytest.raises(QuotaExceeded) as info:
        await w.service.create(ALICE)
    assert (info.value.limit, info.value.quota) == ("max_sessions_per_owner", 2)
    assert len([r for r in w.warm.sessions.values() if r.owner_id == "alice"]) == 2


async def test_deleting_a_session_frees_its_place(w: World) -> None:
    first = await w.service.create(ALICE)
    await w.service.create(ALICE)
    await w.service.delete(ALICE, first.id)
    await w.service.create(ALICE)


async def test_the_quota_counts_the_owner_not_the_caller(w: World) -> None:
    for _ in range(2):
        await w.service.create(ALICE)
    await w.service.create(principal("bob"))  # bob has his own quota
    for _ in range(4):  # a service gets 3x (6), for whichever owner it creates for
        await w.service.create(SERVICE, owner_id="alice")
    with pytest.raises(QuotaExceeded) as info:
        await w.service.create(SERVICE, owner_id="alice")
    assert info.value.quota == 6


async def test_a_replayed_create_is_answered_even_at_the_quota(w: World) -> None:
    key = Idempotency(key_digest="k", fingerprint="f")
    await w.service.create(ALICE)
    first = await w.service.create(ALICE, idem=key)
    again = await w.service.create(ALICE, idem=key)
    assert again.id == first.id


async def test_participants_past_the_quota_are_refused(w: World) -> None:
    session = await w.service.create(ALICE)
    await w.service.add_participant(ALICE, session.id, "a")
    await w.service.add_participant(ALICE, session.id, "b")
    await w.service.add_participant(ALICE, session.id, "a")  # already there: no new place
    with pytest.raises(QuotaExceeded) as info:
        await w.service.add_participant(ALICE, session.id, "c")
    assert (info.value.limit, info.value.quota) == ("max_participants", 2)
    assert set((await w.service.get(ALICE, session.id)).participants) == {"a", "b"}
    await w.service.remove_participant(ALICE, session.id, "a")
    await w.service.add_participant(ALICE, session.id, "c")


async def test_timeline_events_past_the_quota_are_refused_whole(w: World) -> None:
    session = await w.service.create(ALICE)
    await w.service.append(ALICE, session.id, events(4))
    with pytest.raises(QuotaExceeded) as info:
        await w.service.append(ALICE, session.id, events(2))  # 6 > 5: none of them lands
    assert (info.value.limit, info.value.quota) == ("max_timeline_events", 5)
    assert (await w.service.append(ALICE, session.id, events(1))).last_seq == 5
    with pytest.raises(QuotaExceeded):
        await w.service.append(ALICE, session.id, events(1))


async def test_a_service_may_append_past_the_ordinary_quota(w: World) -> None:
    session = await w.service.create(SERVICE)
    result = await w.service.append(SERVICE, session.id, events(10))
    assert result.last_seq == 10
    with pytest.raises(QuotaExceeded):
        await w.service.append(SERVICE, session.id, events(6))  # 16 > 15


async def test_a_keyed_create_does_not_count_its_own_earlier_attempt(w: World) -> None:
    # With ids derived from the Idempotency-Key, a retry finds the session its first attempt
    # stored: that one must not push the owner over the quota it was created within.
    first = await w.service.create(ALICE)
    await w.service.create(ALICE)
    await quotas.check_owner(LIMITS, w.warm, ALICE, "alice", other_than=first.id)
    with pytest.raises(QuotaExceeded):
        await quotas.check_owner(LIMITS, w.warm, ALICE, "alice")

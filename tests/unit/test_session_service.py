"""SessionService against the in-memory fakes of its hot and warm stores (tests/unit/fakes.py)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from sessionmgr.domain.errors import (
    AccessDenied,
    BackendUnavailable,
    ConcurrencyConflict,
    IdempotencyKeyReused,
    InvalidInput,
    ParticipantNotFound,
    PayloadTooLarge,
    SessionNotFound,
    WriteContended,
)
from sessionmgr.domain.model import ContextUpdate, NewEvent, Session, SessionState, utcnow
from sessionmgr.services.ports import Idempotency
from sessionmgr.services.sessions import Limits
from tests.unit.factories import NewEventFactory, json_object, principal
from tests.unit.fakes import World, world

ALICE = principal("alice")
BOB = principal("bob")
ADMIN = principal("root", "admin")
SERVICE = principal("svc", "service")
PLANNER = principal("mad:planner")
LIMITS = Limits(
    max_field_bytes=4096, max_events_per_append=5, page_size_default=4, page_size_max=10
)


@pytest.fixture
def w() -> World:
    return world(LIMITS)


def idem(key: str, body: str = "body") -> Idempotency:
    return Idempotency(key_digest=f"digest-{key}", fingerprint=f"fingerprint-{body}")


def events(*kinds: str) -> list[NewEvent]:
    return [NewEvent(kind=k, data={"n": i}) for i, k in enumerate(kinds)]


async def new_session(w: World, owner: Any = ALICE, **fields: Any) -> Session:
    return await w.service.create(owner, **fields)


async def version_of(w: World, session_id: str) -> int:
    return (await w.service.get(ADMIN, session_id)).version


def interleave(w: World, action: Callable[[], Awaitable[Any]]) -> None:
    """Run `action` once, inside the next hot transaction, between its WATCH and its EXEC."""
    w.hot.between_read_and_commit.append(action)


# -- create ---------------------------------------------------------------------------------


async def test_create_makes_an_active_session_owned_by_the_caller(w: World) -> None:
    created = await new_session(w, work_in_progress={"step": 1}, context_summary={"goal": "x"})

    assert re.fullmatch(r"[0-9a-f]{32}", created.id)
    assert (created.owner_id, created.version, created.state) == ("alice", 1, "active")
    assert created.acl == [] and created.participants == {} and created.recent_timeline == []
    assert created.work_in_progress == {"step": 1}
    assert created.context_summary == {"goal": "x"}
    assert await w.service.get(ALICE, created.id) == created
    stored = w.warm.sessions[created.id]  # written synchronously, before Redis
    assert (stored.version, stored.owner_id, stored.work_in_progress) == (1, "alice", {"step": 1})


async def test_ids_are_random(w: World) -> None:
    ids = {(await new_session(w)).id for _ in range(20)}
    assert len(ids) == 20


async def test_creating_for_another_owner_needs_admin_or_service(w: World) -> None:
    with pytest.raises(AccessDenied, match="admin or service"):
        await w.service.create(BOB, owner_id="alice")
    assert w.warm.sessions == {}

    for caller in (ADMIN, SERVICE):
        created = await w.service.create(caller, owner_id="alice")
        assert created.owner_id == "alice"
        assert (await w.service.get(ALICE, created.id)).owner_id == "alice"


async def test_naming_oneself_as_owner_needs_no_role(w: World) -> None:
    assert (await w.service.create(BOB, owner_id="bob")).owner_id == "bob"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"work_in_progress": {"$set": 1}}, InvalidInput),
        ({"context_summary": {"a.b": 1}}, InvalidInput),
        ({"work_in_progress": {"n": 2**64}}, InvalidInput),
        ({"context_summary": {"blob": "x" * 5000}}, PayloadTooLarge),
    ],
)
async def test_create_refuses_unstorable_values_and_stores_nothing(
    w: World, fields: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await w.service.create(ALICE, **fields)
    assert w.warm.sessions == {}
    assert w.hot.hashes == {}


async def test_create_with_redis_down_leaves_a_valid_dormant_session(w: World) -> None:
    w.hot.down = True
    with pytest.raises(BackendUnavailable) as caught:
        await new_session(w, work_in_progress={"a": 1})
    assert caught.value.backend == "redis"
    w.hot.down = False

    [(session_id, stored)] = w.warm.sessions.items()
    session = await w.service.get(ALICE, session_id)
    assert (session.version, session.state, session.work_in_progress) == (1, "dormant", {"a": 1})
    assert stored.owner_id == "alice"


# -- get ------------------------------------------------------------------------------------


async def test_get_checks_access(w: World) -> None:
    created = await new_session(w)
    assert (await w.service.get(ADMIN, created.id)).id == created.id
    with pytest.raises(AccessDenied):
        await w.service.get(BOB, created.id)
    with pytest.raises(SessionNotFound):
        await w.service.get(ALICE, "0" * 32)


async def test_get_full_adds_the_full_context_and_timeline(w: World) -> None:
    created = await new_session(w)
    await w.service.update(
        ALICE, created.id, expected_version=1, patch={"full_context": {"doc": "long"}}
    )
    await w.service.append(ALICE, created.id, events("a", "b"))

    plain = await w.service.get(ALICE, created.id)
    full = await w.service.get(ALICE, created.id, full=True)
    assert plain.full_context is msgspec.UNSET
    assert plain.full_timeline is msgspec.UNSET
    assert "full_context" not in _encoded_keys(plain)
    assert full.full_context == {"doc": "long"}
    assert isinstance(full.full_timeline, list)
    assert [e.seq for e in full.full_timeline] == [1, 2]


def _encoded_keys(session: Session) -> set[str]:
    import msgspec

    return set(msgspec.json.decode(msgspec.json.encode(session)))


# -- update ---------------------------------------------------------------------------------


async def test_update_bumps_the_version_and_changes_only_the_patched_fields(w: World) -> None:
    created = await new_session(w, work_in_progress={"step": 1}, context_summary={"goal": "x"})
    before = utcnow()

    updated = await w.service.update(
        ALICE, created.id, expected_version=1, patch={"context_summary": {"goal": "y"}}
    )

    assert updated.version == 2
    assert updated.context_summary == {"goal": "y"}
    assert updated.work_in_progress == {"step": 1}
    assert (updated.owner_id, updated.created_at, updated.acl) == (
        created.owner_id,
        created.created_at,
        created.acl,
    )
    assert updated.last_active >= before - timedelta(milliseconds=1)
    assert await w.service.get(ALICE, created.id) == updated


async def test_a_stale_version_is_a_conflict_that_names_the_current_one(w: World) -> None:
    created = await new_session(w, work_in_progress={"v": 1})
    await w.service.update(ALICE, created.id, expected_version=1, patch={"work_in_progress": {}})

    with pytest.raises(ConcurrencyConflict) as caught:
        await w.service.update(
            ALICE, created.id, expected_version=1, patch={"work_in_progress": {"lost": True}}
        )
    assert caught.value.current_version == 2
    assert caught.value.behind, "1 is passed: no later write brings it back"
    session = await w.service.get(ALICE, created.id)
    assert (session.version, session.work_in_progress) == (2, {})
    with pytest.raises(ConcurrencyConflict) as ahead:
        await w.service.update(
            ALICE, created.id, expected_version=3, patch={"work_in_progress": {}}
        )
    assert not ahead.value.behind, "3 is ahead: a write may yet reach it"


async def test_a_stranger_cannot_update_and_nothing_changes(w: World) -> None:
    created = await new_session(w, work_in_progress={"v": 1})
    with pytest.raises(AccessDenied):
        await w.service.update(
            BOB, created.id, expected_version=1, patch={"work_in_progress": {"pwned": 1}}
        )
    assert await w.service.get(ALICE, created.id) == created
    assert w.hot.outbox == []


async def test_acl_members_and_admins_may_update(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    by_member = await w.service.update(
        PLANNER, created.id, expected_version=2, patch={"work_in_progress": {"by": "planner"}}
    )
    by_admin = await w.service.update(
        ADMIN, created.id, expected_version=3, patch={"context_summary": {"by": "admin"}}
    )
    assert (by_member.version, by_admin.version) == (3, 4)
    assert by_admin.work_in_progress == {"by": "planner"}


@pytest.mark.parametrize(
    "patch",
    [
        {"version": {}},
        {"owner_id": {}},
        {"acl": {}},
        {},
        {"work_in_progress": [1]},
        {"context_summary": {"$x": 1}},
    ],
)
async def test_an_invalid_patch_changes_nothing(w: World, patch: dict[str, Any]) -> None:
    created = await new_session(w)
    with pytest.raises(InvalidInput):
        await w.service.update(ALICE, created.id, expected_version=1, patch=patch)
    assert await w.service.get(ALICE, created.id) == created


async def test_an_oversized_field_is_refused(w: World) -> None:
    created = await new_session(w)
    with pytest.raises(PayloadTooLarge):
        await w.service.update(
            ALICE, created.id, expected_version=1, patch={"full_context": {"blob": "x" * 5000}}
        )
    assert await version_of(w, created.id) == 1


async def test_updating_a_missing_session_is_not_found(w: World) -> None:
    with pytest.raises(SessionNotFound):
        await w.service.update(ALICE, "f" * 32, expected_version=1, patch={"context_summary": {}})


async def test_a_concurrent_write_between_watch_and_exec_is_a_conflict(w: World) -> None:
    created = await new_session(w, work_in_progress={"v": 1})
    interleave(w, lambda: w.service.append(ALICE, created.id, events("x")))

    with pytest.raises(ConcurrencyConflict) as caught:
        await w.service.update(
            ALICE, created.id, expected_version=1, patch={"work_in_progress": {"v": "stale"}}
        )
    assert caught.value.current_version == 2
    session = await w.service.get(ALICE, created.id)
    assert (session.version, session.work_in_progress) == (2, {"v": 1})


# -- append ---------------------------------------------------------------------------------


async def test_append_numbers_events_without_gaps_and_stamps_the_caller(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")  # version 2

    first = await w.service.append(PLANNER, created.id, events("plan", "tool.call"))
    second = await w.service.append(ALICE, created.id, events("note", "note", "msg/out"))

    assert (first.version, first.appended, first.first_seq, first.last_seq) == (3, 2, 1, 2)
    assert (second.version, second.appended, second.first_seq, second.last_seq) == (4, 3, 3, 5)
    timeline = (await w.service.get(ALICE, created.id)).recent_timeline
    assert [e.seq for e in timeline] == [1, 2, 3, 4, 5]
    assert [e.actor for e in timeline] == ["mad:planner"] * 2 + ["alice"] * 3
    assert [e.kind for e in timeline] == ["plan", "tool.call", "note", "note", "msg/out"]
    assert [e.data for e in timeline] == [{"n": 0}, {"n": 1}, {"n": 0}, {"n": 1}, {"n": 2}]


async def test_the_recent_timeline_keeps_only_the_last_events() -> None:
    w = world(Limits(recent_timeline=3))
    created = await new_session(w)
    for _ in range(3):
        await w.service.append(ALICE, created.id, events("a", "b"))
    recent = (await w.service.get(ALICE, created.id)).recent_timeline
    assert [e.seq for e in recent] == [4, 5, 6]


async def test_concurrent_appends_both_land_without_gaps(w: World) -> None:
    created = await new_session(w)
    interleave(w, lambda: w.service.append(ALICE, created.id, events("first")))

    result = await w.service.append(ALICE, created.id, events("second"))

    assert (result.version, result.first_seq) == (3, 2)
    timeline = (await w.service.get(ALICE, created.id)).recent_timeline
    assert [(e.seq, e.kind) for e in timeline] == [(1, "first"), (2, "second")]


async def test_append_with_a_stale_expected_version_conflicts(w: World) -> None:
    created = await new_session(w)
    await w.service.append(ALICE, created.id, events("a"))
    with pytest.raises(ConcurrencyConflict) as caught:
        await w.service.append(ALICE, created.id, events("b"), expected_version=1)
    assert caught.value.current_version == 2
    ok = await w.service.append(ALICE, created.id, events("b"), expected_version=2)
    assert ok.first_seq == 2


@pytest.mark.parametrize(
    ("batch", "error", "field"),
    [
        ([], InvalidInput, "events"),
        (events(*["k"] * 6), InvalidInput, "events"),
        ([NewEvent(kind="ok"), NewEvent(kind="bad kind")], InvalidInput, "events[1].kind"),
        ([NewEvent(kind="")], InvalidInput, "events[0].kind"),
        ([NewEvent(kind="k" * 65)], InvalidInput, "events[0].kind"),
        ([NewEvent(kind="ok", data={"$inc": 1})], InvalidInput, "events[0].data"),
        ([NewEvent(kind="ok", data={"b": "x" * 5000})], PayloadTooLarge, None),
    ],
    ids=["empty", "too-many", "bad-kind", "empty-kind", "long-kind", "bad-key", "too-large"],
)
async def test_append_limits(
    w: World, batch: list[NewEvent], error: type[Exception], field: str | None
) -> None:
    created = await new_session(w)
    with pytest.raises(error) as caught:
        await w.service.append(ALICE, created.id, batch)
    if field is not None:
        assert getattr(caught.value, "field", None) == field
    session = await w.service.get(ALICE, created.id)
    assert (session.version, session.recent_timeline) == (1, [])


async def test_the_maximum_batch_is_accepted(w: World) -> None:
    created = await new_session(w)
    batch = NewEventFactory.batch(LIMITS.max_events_per_append)
    result = await w.service.append(ALICE, created.id, batch)
    assert (result.appended, result.last_seq) == (5, 5)


async def test_a_stranger_cannot_append(w: World) -> None:
    created = await new_session(w)
    with pytest.raises(AccessDenied):
        await w.service.append(BOB, created.id, events("x"))
    assert (await w.service.get(ALICE, created.id)).recent_timeline == []


# -- participants and leases ----------------------------------------------------------------


async def test_add_participant_grants_access_and_starts_a_lease(w: World) -> None:
    created = await new_session(w)
    before = utcnow()
    session = await w.service.add_participant(ALICE, created.id, "planner")

    assert session.version == 2
    assert session.acl == ["mad:planner"]
    joined = session.participants["planner"]
    assert joined.active
    assert before <= joined.lease_expires_at <= utcnow() + timedelta(seconds=30)
    assert 29_000 < w.hot.lease_left_ms(created.id, "planner") <= 30_000
    assert (await w.service.get(PLANNER, created.id)).version == 2


async def test_adding_a_participant_again_keeps_the_version_and_renews_the_lease(
    w: World,
) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    w.hot.set_lease_left_ms(created.id, "planner", 1000)

    again = await w.service.add_participant(ALICE, created.id, "planner")

    assert again.version == 2
    assert again.acl == ["mad:planner"]
    assert list(again.participants) == ["planner"]
    assert w.hot.lease_left_ms(created.id, "planner") > 29_000
    assert len(w.hot.outbox) == 1  # only the first add was a change


async def test_a_participant_whose_lease_lapsed_reads_as_inactive(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    del w.hot.leases[(created.id, "planner")]
    session = await w.service.get(ALICE, created.id)
    assert not session.participants["planner"].active
    assert session.acl == ["mad:planner"]  # a lapsed lease is not a removal


@pytest.mark.parametrize("name", ["", "-lead", "has space", "x" * 65, "a/b", "mad:x", "a.b"])
async def test_participant_names_are_checked(w: World, name: str) -> None:
    created = await new_session(w)
    with pytest.raises(InvalidInput) as caught:
        await w.service.add_participant(ALICE, created.id, name)
    assert caught.value.field == "mad_name"


async def test_a_stranger_cannot_add_a_participant(w: World) -> None:
    created = await new_session(w)
    with pytest.raises(AccessDenied):
        await w.service.add_participant(BOB, created.id, "bob-bot")
    assert (await w.service.get(ALICE, created.id)).acl == []


async def test_remove_participant_revokes_access_and_the_lease(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    await w.service.add_participant(ALICE, created.id, "coder")

    await w.service.remove_participant(ALICE, created.id, "planner")

    session = await w.service.get(ALICE, created.id)
    assert session.version == 4
    assert session.acl == ["mad:coder"]
    assert list(session.participants) == ["coder"]
    assert w.hot.lease_left_ms(created.id, "planner") == -2
    with pytest.raises(AccessDenied):
        await w.service.get(PLANNER, created.id)


async def test_removing_an_absent_participant_is_not_found_and_changes_nothing(w: World) -> None:
    created = await new_session(w)
    with pytest.raises(ParticipantNotFound):
        await w.service.remove_participant(ALICE, created.id, "ghost")
    assert await w.service.get(ALICE, created.id) == created


async def test_a_mad_may_renew_its_own_lease(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    w.hot.set_lease_left_ms(created.id, "planner", 500)

    lease = await w.service.renew_lease(PLANNER, created.id, "planner")

    assert lease.mad_name == "planner"
    now = utcnow()
    assert now + timedelta(seconds=29) < lease.expires_at <= now + timedelta(seconds=30)
    assert w.hot.lease_left_ms(created.id, "planner") > 29_000


async def test_the_owner_may_renew_a_lease_but_a_stranger_may_not(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    assert (await w.service.renew_lease(ALICE, created.id, "planner")).mad_name == "planner"
    with pytest.raises(AccessDenied):
        await w.service.renew_lease(BOB, created.id, "planner")


async def test_renewing_the_lease_of_a_non_participant_is_not_found(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    await w.service.remove_participant(ALICE, created.id, "planner")
    with pytest.raises(SessionNotFound):
        await w.service.renew_lease(ALICE, created.id, "ghost")
    with pytest.raises(AccessDenied):  # removed: it left the ACL, so it is a stranger now
        await w.service.renew_lease(PLANNER, created.id, "planner")
    assert w.hot.lease_left_ms(created.id, "planner") == -2


async def test_a_stranger_mad_cannot_wake_a_dormant_session_through_a_lease(w: World) -> None:
    created = await new_session(w)
    await w.service.suspend(ALICE, created.id)
    intruder = principal("mad:intruder")

    with pytest.raises((SessionNotFound, AccessDenied)):
        await w.service.renew_lease(intruder, created.id, "intruder")

    assert (await w.service.get(ALICE, created.id)).state == "dormant"
    assert not w.hot.is_hot(created.id)


# -- suspend, resume, reactivation ----------------------------------------------------------


async def test_suspend_flushes_everything_to_warm_and_reads_back_dormant(w: World) -> None:
    created = await new_session(w, work_in_progress={"a": 1})
    await w.service.update(
        ALICE, created.id, expected_version=1, patch={"full_context": {"doc": 1}}
    )
    await w.service.append(ALICE, created.id, events("a", "b"))

    suspended = await w.service.suspend(ALICE, created.id)

    assert (suspended.state, suspended.version) == ("dormant", 3)
    assert [e.seq for e in suspended.recent_timeline] == [1, 2]
    assert not w.hot.is_hot(created.id)
    assert created.id not in w.hot.timelines
    stored = w.warm.sessions[created.id]  # no write-behind ran: the flush carried it all
    assert (stored.version, stored.state) == (3, "dormant")
    assert w.warm.contexts[created.id] == ContextUpdate(version=2, value={"doc": 1})
    again = await w.service.get(ALICE, created.id, full=True)
    assert (again.state, again.version, again.work_in_progress) == ("dormant", 3, {"a": 1})
    assert again.full_context == {"doc": 1}
    assert [e.kind for e in again.recent_timeline] == ["a", "b"]


async def test_suspending_twice_is_harmless(w: World) -> None:
    created = await new_session(w)
    first = await w.service.suspend(ALICE, created.id)
    second = await w.service.suspend(ALICE, created.id)
    assert (second.state, second.version) == (first.state, first.version) == ("dormant", 1)


async def test_a_stranger_cannot_suspend(w: World) -> None:
    created = await new_session(w)
    with pytest.raises(AccessDenied):
        await w.service.suspend(BOB, created.id)
    assert (await w.service.get(ALICE, created.id)).state == "active"


async def test_an_update_racing_a_suspend_is_never_dropped(w: World) -> None:
    created = await new_session(w)
    real_flush = w.warm.flush
    raced: list[int] = []

    async def flush_with_a_racing_update(record: Any, recent: Any, context: Any) -> bool:
        if not raced:
            raced.append(1)
            await w.service.update(
                ALICE, created.id, expected_version=1, patch={"work_in_progress": {"raced": True}}
            )
        return await real_flush(record, recent, context)

    w.warm.flush = flush_with_a_racing_update  # type: ignore[method-assign,assignment]
    suspended = await w.service.suspend(ALICE, created.id)

    assert suspended.version == 2
    assert w.warm.sessions[created.id].work_in_progress == {"raced": True}
    after = await w.service.get(ALICE, created.id)
    assert (after.state, after.version, after.work_in_progress) == ("dormant", 2, {"raced": True})


async def test_a_mutation_on_a_dormant_session_reactivates_it(w: World) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    await w.service.append(ALICE, created.id, events("a", "b"))
    await w.service.suspend(ALICE, created.id)

    result = await w.service.append(ALICE, created.id, events("c"))

    assert (result.version, result.first_seq) == (4, 3)
    session = await w.service.get(ALICE, created.id)
    assert session.state == "active"
    assert [e.seq for e in session.recent_timeline] == [1, 2, 3]
    assert session.acl == ["mad:planner"]
    assert w.hot.is_hot(created.id)


async def test_an_update_on_a_dormant_session_uses_its_version(w: World) -> None:
    created = await new_session(w)
    await w.service.update(ALICE, created.id, expected_version=1, patch={"context_summary": {}})
    await w.service.suspend(ALICE, created.id)
    with pytest.raises(ConcurrencyConflict):
        await w.service.update(
            ALICE, created.id, expected_version=1, patch={"context_summary": {"x": 1}}
        )
    updated = await w.service.update(
        ALICE, created.id, expected_version=2, patch={"context_summary": {"x": 1}}
    )
    assert (updated.version, updated.state) == (3, "active")


async def test_a_stranger_cannot_reactivate_a_dormant_session(w: World) -> None:
    created = await new_session(w)
    await w.service.suspend(ALICE, created.id)
    with pytest.raises(AccessDenied):
        await w.service.update(BOB, created.id, expected_version=1, patch={"context_summary": {}})
    with pytest.raises(AccessDenied):
        await w.service.resume(BOB, created.id)
    assert not w.hot.is_hot(created.id)
    assert w.warm.sessions[created.id].state == "dormant"


async def test_resume_brings_a_dormant_session_back_unchanged(w: World) -> None:
    created = await new_session(w, work_in_progress={"a": 1})
    await w.service.suspend(ALICE, created.id)
    resumed = await w.service.resume(ALICE, created.id)
    assert (resumed.state, resumed.version, resumed.work_in_progress) == ("active", 1, {"a": 1})
    assert (await w.service.resume(ALICE, created.id)).state == "active"  # already active
    assert w.warm.sessions[created.id].state == "active"


async def test_a_suspend_that_cannot_reach_mongodb_keeps_the_session_hot(w: World) -> None:
    created = await new_session(w)
    await w.service.append(ALICE, created.id, events("a"))
    w.warm.down = True
    with pytest.raises(BackendUnavailable) as caught:
        await w.service.suspend(ALICE, created.id)
    assert caught.value.backend == "mongodb"
    w.warm.down = False
    session = await w.service.get(ALICE, created.id)
    assert (session.state, session.version) == ("active", 2)
    assert [e.kind for e in session.recent_timeline] == ["a"]


async def test_suspending_a_missing_session_is_not_found(w: World) -> None:
    with pytest.raises(SessionNotFound):
        await w.service.suspend(ALICE, "c" * 32)


async def test_an_active_session_keeps_working_while_mongodb_is_down(w: World) -> None:
    created = await new_session(w)
    w.warm.down = True
    updated = await w.service.update(
        ALICE, created.id, expected_version=1, patch={"work_in_progress": {"x": 1}}
    )
    appended = await w.service.append(ALICE, created.id, events("a"))
    assert (updated.version, appended.version) == (2, 3)
    assert (await w.service.get(ALICE, created.id)).work_in_progress == {"x": 1}
    w.warm.down = False
    await w.deliver_outbox()
    assert w.warm.sessions[created.id].version == 3


# -- delete ---------------------------------------------------------------------------------


@pytest.mark.parametrize("caller", [ALICE, ADMIN], ids=["owner", "admin"])
async def test_delete_removes_the_session_everywhere(w: World, caller: Any) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    await w.service.append(ALICE, created.id, events("a"))

    await w.service.delete(caller, created.id)

    with pytest.raises(SessionNotFound):
        await w.service.get(ALICE, created.id)
    with pytest.raises(SessionNotFound):
        await w.service.update(ALICE, created.id, expected_version=3, patch={"full_context": {}})
    assert created.id not in w.warm.sessions
    assert not w.hot.is_hot(created.id)
    assert created.id not in w.hot.timelines
    assert w.hot.lease_left_ms(created.id, "planner") == -2


async def test_delete_works_on_a_dormant_session(w: World) -> None:
    created = await new_session(w)
    await w.service.suspend(ALICE, created.id)
    await w.service.delete(ALICE, created.id)
    with pytest.raises(SessionNotFound):
        await w.service.get(ALICE, created.id)


@pytest.mark.parametrize("caller", [PLANNER, BOB], ids=["acl-member", "stranger"])
async def test_only_owner_or_admin_may_delete(w: World, caller: Any) -> None:
    created = await new_session(w)
    await w.service.add_participant(ALICE, created.id, "planner")
    with pytest.raises(AccessDenied):
        await w.service.delete(caller, created.id)
    assert (await w.service.get(ALICE, created.id)).version == 2
    assert created.id in w.warm.sessions


async def test_deleting_a_missing_session_is_not_found(w: World) -> None:
    with pytest.raises(SessionNotFound):
        await w.service.delete(ALICE, "a" * 32)


# -- list -----------------------------------------------------------------------------------


async def test_list_pages_through_the_callers_sessions_with_cursors(w: World) -> None:
    mine = {(await new_session(w)).id for _ in range(7)}
    for _ in range(2):
        await new_session(w, BOB)

    pages = [await w.service.list_sessions(ALICE, limit=3)]
    while pages[-1].next_cursor:
        pages.append(await w.service.list_sessions(ALICE, limit=3, cursor=pages[-1].next_cursor))

    assert [len(p.items) for p in pages] == [3, 3, 1]
    ids = [s.id for p in pages for s in p.items]
    assert ids == sorted(mine)
    assert pages[-1].next_cursor is None
    assert all(s.owner_id == "alice" for p in pages for s in p.items)


async def test_list_includes_sessions_shared_through_the_acl(w: World) -> None:
    await new_session(w)
    shared = await new_session(w, BOB)
    await w.service.add_participant(BOB, shared.id, "planner")
    await w.deliver_outbox()  # the ACL reaches MongoDB through the write-behind

    page = await w.service.list_sessions(PLANNER)
    assert [s.id for s in page.items] == [shared.id]


async def test_an_admin_lists_everything(w: World) -> None:
    for owner in (ALICE, BOB, SERVICE):
        await new_session(w, owner)
    page = await w.service.list_sessions(ADMIN, limit=10)
    assert {s.owner_id for s in page.items} == {"alice", "bob", "svc"}


async def test_list_filters_by_state_and_uses_the_default_page_size(w: World) -> None:
    ids = [(await new_session(w)).id for _ in range(6)]
    for session_id in ids[:2]:
        await w.service.suspend(ALICE, session_id)
    dormant = await w.service.list_sessions(ALICE, state=SessionState.DORMANT)
    assert sorted(s.id for s in dormant.items) == sorted(ids[:2])
    everything = await w.service.list_sessions(ALICE)
    assert len(everything.items) == LIMITS.page_size_default
    assert everything.next_cursor is not None


@pytest.mark.parametrize(
    "cursor",
    ["!!!", "garbage", "bm90LWhleA", "%%%", "AAAA", "4pyT"],
)
async def test_a_cursor_not_handed_out_is_invalid(w: World, cursor: str) -> None:
    await new_session(w)
    with pytest.raises(InvalidInput) as caught:
        await w.service.list_sessions(ALICE, cursor=cursor)
    assert caught.value.field == "cursor"


async def test_page_size_is_capped_at_the_maximum(w: World) -> None:
    for _ in range(LIMITS.page_size_max + 2):
        await new_session(w)
    page = await w.service.list_sessions(ALICE, limit=1000)
    assert len(page.items) == LIMITS.page_size_max
    assert page.next_cursor is not None


async def test_a_negative_page_size_is_invalid(w: World) -> None:
    with pytest.raises(InvalidInput) as caught:
        await w.service.list_sessions(ALICE, limit=-1)
    assert caught.value.field == "limit"


# -- idempotency ----------------------------------------------------------------------------


async def test_a_repeated_create_returns_the_first_session(w: World) -> None:
    first = await w.service.create(ALICE, work_in_progress={"a": 1}, idem=idem("k1"))
    again = await w.service.create(ALICE, work_in_progress={"a": 1}, idem=idem("k1"))
    assert again == first
    assert len(w.warm.sessions) == 1
    with pytest.raises(IdempotencyKeyReused):
        await w.service.create(ALICE, work_in_progress={"a": 2}, idem=idem("k1", "other"))
    assert len(w.warm.sessions) == 1


async def test_a_repeated_update_returns_the_first_answer(w: World) -> None:
    created = await new_session(w)
    patch = {"work_in_progress": {"n": 1}}
    first = await w.service.update(
        ALICE, created.id, expected_version=1, patch=patch, idem=idem("k")
    )
    again = await w.service.update(
        ALICE, created.id, expected_version=1, patch=patch, idem=idem("k")
    )
    assert again == first
    assert await version_of(w, created.id) == 2

    with pytest.raises(IdempotencyKeyReused):
        await w.service.update(
            ALICE,
            created.id,
            expected_version=2,
            patch={"work_in_progress": {"n": 2}},
            idem=idem("k", "other"),
        )
    assert (await w.service.get(ALICE, created.id)).work_in_progress == {"n": 1}


async def test_a_repeated_append_is_applied_once(w: World) -> None:
    created = await new_session(w)
    first = await w.service.append(ALICE, created.id, events("a"), idem=idem("k"))
    again = await w.service.append(ALICE, created.id, events("a"), idem=idem("k"))
    assert again == first
    assert [e.seq for e in (await w.service.get(ALICE, created.id)).recent_timeline] == [1]


async def test_repeated_naturally_idempotent_calls_replay(w: World) -> None:
    created = await new_session(w)
    first = await w.service.suspend(ALICE, created.id, idem=idem("s"))
    await w.service.resume(ALICE, created.id)
    replayed = await w.service.suspend(ALICE, created.id, idem=idem("s"))
    assert replayed == first
    with pytest.raises(IdempotencyKeyReused):
        await w.service.resume(ALICE, created.id, idem=idem("s", "resume"))
    await w.service.delete(ALICE, created.id, idem=idem("d"))
    await w.service.delete(ALICE, created.id, idem=idem("d"))  # a replay, not a 404


# -- read-only mode -------------------------------------------------------------------------


async def test_get_is_served_from_warm_while_redis_is_down(w: World) -> None:
    created = await new_session(w)
    await w.service.update(
        ALICE, created.id, expected_version=1, patch={"work_in_progress": {"saved": True}}
    )
    await w.service.append(ALICE, created.id, events("a", "b"))
    await w.deliver_outbox()

    w.hot.down = True
    session = await w.service.get(ALICE, created.id)
    assert (session.version, session.work_in_progress) == (3, {"saved": True})
    assert [e.kind for e in session.recent_timeline] == ["a", "b"]
    with pytest.raises(AccessDenied):
        await w.service.get(BOB, created.id)
    with pytest.raises(SessionNotFound):
        await w.service.get(ALICE, "e" * 32)
    assert [s.id for s in (await w.service.list_sessions(ALICE)).items] == [created.id]


async def test_writes_fail_as_unavailable_while_redis_is_down_and_recover(w: World) -> None:
    created = await new_session(w)
    w.hot.down = True
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: w.service.update(
            ALICE, created.id, expected_version=1, patch={"context_summary": {}}
        ),
        lambda: w.service.append(ALICE, created.id, events("a")),
        lambda: w.service.add_participant(ALICE, created.id, "planner"),
        lambda: w.service.suspend(ALICE, created.id),
    ]
    for attempt in attempts:
        with pytest.raises(BackendUnavailable) as caught:
            await attempt()
        assert caught.value.backend == "redis"

    w.hot.down = False
    updated = await w.service.update(
        ALICE, created.id, expected_version=1, patch={"context_summary": {"back": 1}}
    )
    assert updated.version == 2


async def test_random_payloads_round_trip_through_the_service() -> None:
    w = world()
    for _ in range(10):
        wip, ctx, full = json_object(), json_object(), json_object()
        created = await new_session(w, work_in_progress=wip, context_summary=ctx)
        await w.service.update(ALICE, created.id, expected_version=1, patch={"full_context": full})
        session = await w.service.get(ALICE, created.id, full=True)
        assert (session.work_in_progress, session.context_summary) == (wip, ctx)
        assert session.full_context == full


async def test_full_timeline_includes_events_the_write_behind_has_not_delivered(w: World) -> None:
    created = await new_session(w)
    for n in range(30):
        await w.service.append(ALICE, created.id, [NewEvent(kind="note", data={"n": n})])
    # Nothing delivered: MongoDB has none of the 30 events, Redis keeps only the last 20.
    full = await w.service.get(ALICE, created.id, full=True)
    assert isinstance(full.full_timeline, list)
    assert [e.seq for e in full.full_timeline] == list(range(1, 31))


async def test_a_write_whose_session_is_suspended_again_each_time_it_wakes_answers_contended(
    w: World,
) -> None:
    """Woken three times, and each time suspended again (another replica, the idle sweep)
    before the append could land: it did not take effect and named no version, so it is
    `WriteContended` (503, send it again), not a 409 with no version, and no version conflict
    is counted."""
    created = await new_session(w)
    await w.service.suspend(ALICE, created.id)
    real = w.hot.activate
    woken: list[str] = []

    async def woken_then_suspended(session_id: str, load: Any) -> Any:
        woken.append(session_id)
        record = await real(session_id, load)
        w.hot.hashes.pop(session_id, None)  # suspended again before the write
        return record

    w.hot.activate = woken_then_suspended  # type: ignore[method-assign]
    with pytest.raises(WriteContended, match="append") as raised:
        await w.service.append(ALICE, created.id, events("a"))
    assert raised.value.current_version is None
    assert woken == [created.id] * 3
    conflicts = w.service._metrics.version_conflicts.labels("append")._value.get()
    assert conflicts == 0
    assert w.warm.sessions[created.id].timeline_seq == 0, "nothing written"

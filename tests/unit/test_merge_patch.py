"""JSON Merge Patch (RFC 7396) on SessionService over the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest

from sessionmgr.domain.errors import ConcurrencyConflict, InvalidInput, LeaseExpired
from sessionmgr.domain.merge_patch import merge
from sessionmgr.services.sessions import Limits
from tests.unit.factories import principal
from tests.unit.fakes import World, world

ALICE = principal("alice")
PLANNER = principal("mad:planner")


@pytest.fixture
def w() -> World:
    return world(Limits())


def test_merge_follows_rfc_7396() -> None:
    # RFC 7396 appendix A, a few of its cases
    assert merge({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge({"a": "b"}, {"a": None}) == {}
    assert merge({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


async def test_a_merge_patch_changes_nested_keys_only(w: World) -> None:
    s = await w.service.create(
        ALICE,
        work_in_progress={"plan": {"step": 1, "owner": "a", "notes": ["x"]}, "keep": True},
        context_summary={"goal": "ship"},
    )
    merged = await w.service.merge_update(
        ALICE,
        s.id,
        expected_version=1,
        document={"work_in_progress": {"plan": {"step": 2, "owner": None}}},
    )
    assert merged.version == 2
    assert merged.work_in_progress == {"plan": {"step": 2, "notes": ["x"]}, "keep": True}
    assert merged.context_summary == {"goal": "ship"}
    with pytest.raises(ConcurrencyConflict):
        await w.service.merge_update(
            ALICE, s.id, expected_version=1, document={"context_summary": {"goal": None}}
        )


@pytest.mark.parametrize(
    "document",
    [
        [],
        {},
        {"full_context": {"a": 1}},
        {"version": 3},
        {"work_in_progress": None},
        {"work_in_progress": 3},
        {"work_in_progress": {"a.b": 1}},
    ],
    ids=repr,
)
async def test_a_bad_merge_patch_is_refused(w: World, document: Any) -> None:
    s = await w.service.create(ALICE, work_in_progress={"a": 1})
    with pytest.raises(InvalidInput):
        await w.service.merge_update(ALICE, s.id, expected_version=1, document=document)
    assert (await w.service.get(ALICE, s.id)).version == 1


async def test_a_merge_patch_by_a_mad_needs_its_lease(w: World) -> None:
    s = await w.service.create(ALICE)
    await w.service.add_participant(ALICE, s.id, "planner")
    document = {"work_in_progress": {"by": "planner"}}
    done = await w.service.merge_update(PLANNER, s.id, expected_version=2, document=document)
    del w.hot.leases[(s.id, "planner")]  # the lease lapses
    with pytest.raises(LeaseExpired):
        await w.service.merge_update(PLANNER, s.id, expected_version=3, document=document)
    assert done.version == 3

"""`If-Match` in the use cases: a stale one refuses the write before anything changes, and
the check sees the state the write would apply to (inside the transaction's decision)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sessionmgr.domain.errors import PreconditionFailed
from sessionmgr.domain.model import NewEvent, SessionState
from sessionmgr.domain.preconditions import Precondition
from sessionmgr.services.ports import Change, HotView
from tests.unit.factories import principal
from tests.unit.fakes import World, world

ALICE = principal("alice")
STALE = Precondition(versions=frozenset({1}))
ANY = Precondition(any_version=True)


@pytest.fixture
def w() -> World:
    return world()


async def at_version_2(w: World) -> str:
    created = await w.service.create(ALICE, work_in_progress={"step": 1})
    await w.service.add_participant(ALICE, created.id, "planner")  # version 2
    return created.id


WRITES: dict[str, Callable[[World, str, Precondition], Awaitable[Any]]] = {
    "update": lambda w, sid, p: w.service.update(
        ALICE, sid, expected_version=None, patch={"work_in_progress": {"x": 1}}, if_match=p
    ),
    "append": lambda w, sid, p: w.service.append(ALICE, sid, [NewEvent(kind="n")], if_match=p),
    "add": lambda w, sid, p: w.service.add_participant(ALICE, sid, "critic", if_match=p),
    "renew": lambda w, sid, p: w.service.renew_lease(ALICE, sid, "planner", if_match=p),
    "remove": lambda w, sid, p: w.service.remove_participant(ALICE, sid, "planner", if_match=p),
    "suspend": lambda w, sid, p: w.service.suspend(ALICE, sid, if_match=p),
    "resume": lambda w, sid, p: w.service.resume(ALICE, sid, if_match=p),
    "delete": lambda w, sid, p: w.service.delete(ALICE, sid, if_match=p),
}


@pytest.mark.parametrize("name", WRITES)
async def test_a_stale_if_match_refuses_the_write_and_changes_nothing(w: World, name: str):
    sid = await at_version_2(w)
    if name == "resume":
        await w.service.suspend(ALICE, sid)
    before = await w.service.get(ALICE, sid)
    outbox = len(w.hot.outbox)

    with pytest.raises(PreconditionFailed) as caught:
        await WRITES[name](w, sid, STALE)

    assert caught.value.current_version == 2
    after = await w.service.get(ALICE, sid)
    assert (after.version, after.state, after.acl) == (before.version, before.state, before.acl)
    assert len(w.hot.outbox) == outbox


@pytest.mark.parametrize("name", WRITES)
async def test_if_match_star_lets_every_write_through(w: World, name: str):
    sid = await at_version_2(w)
    if name == "resume":
        await w.service.suspend(ALICE, sid)
    await WRITES[name](w, sid, ANY)


async def test_the_check_runs_on_the_state_the_write_applies_to(w: World):
    """A writer that lands between the caller's read and its write makes its If-Match stale:
    the check is part of the decision the transaction re-runs, not a read before it."""
    sid = await at_version_2(w)
    current = Precondition(versions=frozenset({2}))
    transact = w.hot.transact

    async def racing(
        session_id: str, decide: Callable[[HotView], Change], idem: Any, **kw: Any
    ) -> Any:
        w.hot.transact = transact  # type: ignore[method-assign]
        await w.service.append(ALICE, sid, [NewEvent(kind="first")])  # now version 3
        return await transact(session_id, decide, idem, **kw)

    w.hot.transact = racing  # type: ignore[method-assign]
    with pytest.raises(PreconditionFailed) as caught:
        await w.service.update(
            ALICE, sid, expected_version=None, patch={"context_summary": {}}, if_match=current
        )
    assert caught.value.current_version == 3


async def test_a_suspend_checks_under_its_watch(w: World):
    sid = await at_version_2(w)
    with pytest.raises(PreconditionFailed):
        await w.service.suspend(ALICE, sid, if_match=STALE)
    assert (await w.service.get(ALICE, sid)).state is SessionState.ACTIVE

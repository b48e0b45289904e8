"""A replica's writers of one session take turns (storage/write_turns.py): in the order they
came, one at a time, whoever is cancelled where, and nothing kept once no one writes."""

from __future__ import annotations

import asyncio

import pytest

from sessionmgr.storage.write_turns import WriteTurns


async def _writer(turns: WriteTurns, sid: str, name: str, log: list[str]) -> None:
    await turns.enter(sid)
    try:
        log.append(f"{name} in")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log.append(f"{name} out")
    finally:
        turns.leave(sid)


async def test_writers_of_one_session_go_one_at_a_time_in_the_order_they_came() -> None:
    turns, log = WriteTurns(), []
    await asyncio.gather(*(_writer(turns, "s", f"w{i}", log) for i in range(5)))
    assert log == [f"w{i} {step}" for i in range(5) for step in ("in", "out")]
    assert len(turns) == 0, "nothing kept once no one writes"


async def test_writers_of_other_sessions_do_not_wait_for_each_other() -> None:
    turns, log = WriteTurns(), []
    await asyncio.gather(*(_writer(turns, f"s{i}", f"w{i}", log) for i in range(3)))
    assert log[:3] == ["w0 in", "w1 in", "w2 in"]
    assert len(turns) == 0


async def test_a_waiter_cancelled_in_the_queue_is_skipped() -> None:
    turns = WriteTurns()
    await turns.enter("s")  # held
    second = asyncio.create_task(turns.enter("s"))
    third = asyncio.create_task(turns.enter("s"))
    await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    turns.leave("s")
    await asyncio.wait_for(third, 1)  # the turn went past the cancelled one
    turns.leave("s")
    assert len(turns) == 0


async def test_a_waiter_cancelled_once_handed_its_turn_passes_it_on() -> None:
    turns = WriteTurns()
    await turns.enter("s")
    second = asyncio.create_task(turns.enter("s"))
    third = asyncio.create_task(turns.enter("s"))
    await asyncio.sleep(0)
    turns.leave("s")  # hands the turn to `second`, which has not run yet
    second.cancel()  # ... and is cancelled before it does
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.wait_for(third, 1)  # the turn was not lost with it
    turns.leave("s")
    assert len(turns) == 0


async def test_a_newcomer_does_not_overtake_a_waiter_handed_the_turn() -> None:
    turns, order = WriteTurns(), []
    await turns.enter("s")

    async def named(name: str) -> None:
        await turns.enter("s")
        order.append(name)
        turns.leave("s")

    waiting = asyncio.create_task(named("waiting"))
    await asyncio.sleep(0)
    turns.leave("s")  # handed to `waiting`, which has not resumed yet
    newcomer = asyncio.create_task(named("newcomer"))
    await asyncio.gather(waiting, newcomer)
    assert order == ["waiting", "newcomer"]
    assert len(turns) == 0


async def test_a_waiter_that_times_out_has_no_turn_and_loses_no_one_elses() -> None:
    turns = WriteTurns()
    await turns.enter("s")
    with pytest.raises(TimeoutError):
        await turns.enter("s", 0.01)
    third = asyncio.create_task(turns.enter("s", 1))
    await asyncio.sleep(0)
    turns.leave("s")
    await asyncio.wait_for(third, 1)
    turns.leave("s")
    assert len(turns) == 0

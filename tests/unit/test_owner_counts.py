"""OwnerCounts: when a create may skip counting the owner's sessions in MongoDB (issue 16)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.services.ports import WarmStore
from sessionmgr.services.quotas import OwnerCounts, check_owner
from sessionmgr.services.sessions import Limits
from tests.unit.factories import principal

ANA = principal("ana")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_fresh_count_well_under_the_quota_admits_the_next_creates() -> None:
    clock = Clock()
    counts = OwnerCounts(1.0, clock)
    assert not counts.admit("ana", 100)  # never counted: count first

    counts.counted("ana", 10)  # 10 stored, the 11th being created

    assert all(counts.admit("ana", 100) for _ in range(39))  # the 12th to the 50th
    assert not counts.admit("ana", 100)  # the 51st would pass half the quota: count again


def test_a_count_older_than_the_ttl_is_not_used() -> None:
    clock = Clock()
    counts = OwnerCounts(1.0, clock)
    counts.counted("ana", 0)
    clock.now += 1.5

    assert not counts.admit("ana", 100)


def test_an_owner_near_the_quota_is_counted_before_every_create() -> None:
    counts = OwnerCounts(60.0, Clock())
    counts.counted("ana", 2)

    assert not counts.admit("ana", 5)


def test_ttl_zero_always_counts() -> None:
    counts = OwnerCounts(0.0, Clock())
    counts.counted("ana", 0)

    assert not counts.admit("ana", 1000)


def test_owners_are_counted_apart() -> None:
    counts = OwnerCounts(1.0, Clock())
    counts.counted("ana", 0)

    assert counts.admit("ana", 100)
    assert not counts.admit("bob", 100)


# -- one count of an owner at a time (check_owner) -----------------------------------------------


class SlowCounts:
    """A warm store whose count waits for `release`: the creates of a burst all arrive while
    the first count is on its way, as they do against a slow server."""

    def __init__(self, stored: int) -> None:
        self.stored = stored
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def count_owned(self, owner_id: str, limit: int, other_than: str | None = None) -> int:
        self.calls += 1
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return min(limit, self.stored)


def create(warm: SlowCounts, counts: OwnerCounts, limits: Limits) -> Coroutine[Any, Any, None]:
    """The quota check of one create of ana's."""
    return check_owner(limits, cast(WarmStore, warm), ANA, "ana", counts=counts)


async def burst(
    warm: SlowCounts, counts: OwnerCounts, n: int, cap: int = 1000
) -> list[BaseException | None]:
    limits = Limits(max_sessions_per_owner=cap)
    tasks = [asyncio.create_task(create(warm, counts, limits)) for _ in range(n)]
    await asyncio.sleep(0)  # every create is in flight before the count answers
    warm.release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_burst_of_creates_of_one_owner_makes_one_count() -> None:
    # Before: each create that found no estimate counted (64 creates in flight, 64 scans).
    warm = SlowCounts(stored=10)
    counts = OwnerCounts(1.0)

    results = await burst(warm, counts, 20)

    assert results == [None] * 20
    assert warm.calls == 1
    # The estimate holds 10 stored + these 20: one more fits under half a quota of 62, two not.
    assert counts.admit("ana", 62)
    assert not counts.admit("ana", 62)


async def test_a_burst_of_an_owner_over_half_the_quota_counts_for_each_create() -> None:
    warm = SlowCounts(stored=60)
    results = await burst(warm, OwnerCounts(1.0), 5, cap=100)

    assert results == [None] * 5
    assert warm.calls == 5  # the one they waited for, then one each but the first's


async def test_with_the_estimate_off_each_create_counts() -> None:
    warm = SlowCounts(stored=0)
    await burst(warm, OwnerCounts(0.0), 5)

    assert warm.calls == 5


async def test_a_failed_count_leaves_the_waiting_creates_to_count_for_themselves() -> None:
    warm = SlowCounts(stored=0)
    warm.fail = BackendUnavailable("mongodb", "down")

    results = await burst(warm, OwnerCounts(1.0), 3)

    assert all(isinstance(r, BackendUnavailable) for r in results)
    assert warm.calls == 3


async def test_a_create_cancelled_while_it_counts_does_not_hold_the_others() -> None:
    warm = SlowCounts(stored=0)
    counts = OwnerCounts(1.0)
    limits = Limits()
    first = asyncio.create_task(create(warm, counts, limits))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(create(warm, counts, limits))
    await asyncio.sleep(0)

    first.cancel()
    await asyncio.sleep(0)
    warm.release.set()
    await asyncio.wait_for(waiting, 1)  # it counted for itself and was admitted

    assert warm.calls == 2


async def test_a_waiting_create_cancelled_does_not_cancel_the_count() -> None:
    warm = SlowCounts(stored=0)
    counts = OwnerCounts(1.0)
    limits = Limits()
    first = asyncio.create_task(create(warm, counts, limits))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(create(warm, counts, limits))
    await asyncio.sleep(0)

    waiting.cancel()
    await asyncio.sleep(0)
    warm.release.set()
    await asyncio.wait_for(first, 1)

    assert warm.calls == 1
    assert waiting.cancelled()

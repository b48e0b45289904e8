"""OwnerCounts: when a create may skip counting the owner's sessions in MongoDB (issue 16)."""

from __future__ import annotations

from sessionmgr.services.quotas import OwnerCounts


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

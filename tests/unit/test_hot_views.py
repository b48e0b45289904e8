"""The views a replica remembers (storage/hot_views.py): bounded in bytes, handed out as
copies, never with a lease near its end."""

from __future__ import annotations

import time

from sessionmgr.domain.model import TimelineEvent
from sessionmgr.services.ports import HotView
from sessionmgr.storage.hot_views import ENTRY_SHARE, HotViews, Seen
from tests.unit.factories import SessionRecordFactory


def seen(size: int, deadlines: dict[str, float] | None = None) -> Seen:
    record = SessionRecordFactory.build(work_in_progress={"n": 1})
    return Seen(
        view=HotView(record=record, recent=[]),
        rev=b"r",
        field_sizes={"work_in_progress": size},
        deadlines=deadlines or {},
    )


def test_the_least_recently_written_go_first_once_the_bytes_are_spent() -> None:
    views = HotViews(budget_bytes=ENTRY_SHARE * 100)
    for n in range(ENTRY_SHARE + 6):
        views.put(f"s{n}", seen(100))  # each the largest share of the budget a view may take
    views.get("s0")  # reading is not writing: s0 is still the oldest

    assert len(views) == ENTRY_SHARE
    assert views.bytes == ENTRY_SHARE * 100
    gone = [n for n in range(ENTRY_SHARE + 6) if views.get(f"s{n}") is None]
    assert gone == [0, 1, 2, 3, 4, 5]


def test_writing_a_session_again_replaces_its_view_and_its_bytes() -> None:
    views = HotViews(budget_bytes=64 * 100)
    views.put("a", seen(40))
    views.put("a", seen(60))

    assert len(views) == 1
    assert views.bytes == 60


def test_a_view_larger_than_its_share_of_the_budget_is_not_kept() -> None:
    views = HotViews(budget_bytes=ENTRY_SHARE * 100)
    views.put("a", seen(100))
    views.put("a", seen(101))  # 64 * 100 / 64 = 100 bytes at most

    assert views.get("a") is None, "the old view of the session is dropped, not kept"
    assert views.bytes == 0


def test_a_budget_of_nothing_keeps_nothing() -> None:
    views = HotViews(budget_bytes=0)
    views.put("a", seen(1))

    assert views.get("a") is None and views.bytes == 0


def test_a_view_is_handed_out_as_a_copy() -> None:
    views = HotViews(budget_bytes=1 << 20)
    views.put("a", seen(10))

    first = views.get("a")
    assert first is not None and first.view is not None
    first.view.record.version = 99
    first.view.recent.append(
        TimelineEvent(seq=1, at=first.view.record.created_at, actor="a", kind="k")
    )

    again = views.get("a")
    assert again is not None and again.view is not None
    assert again.view.record.version != 99
    assert again.view.recent == []
    assert again.fresh is False, "remembered, not read"


def test_a_lease_within_a_second_of_its_end_makes_the_view_unusable() -> None:
    views = HotViews(budget_bytes=1 << 20)
    now = time.monotonic()
    views.put("long", seen(10, {"m": now + 5}))
    views.put("short", seen(10, {"m": now + 0.5, "other": now + 30}))

    long = views.get("long")
    assert long is not None and long.view is not None
    assert 4000 < long.view.lease_ttl_ms["m"] <= 5000
    assert views.get("short") is None
    assert views.bytes == 10, "the unusable view is dropped"

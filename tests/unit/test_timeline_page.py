"""`page_of`: a timeline page merged from MongoDB and the events that have not reached it."""

from __future__ import annotations

from sessionmgr.domain.model import TimelineEvent, utcnow
from sessionmgr.services.timeline import page_of

NOW = utcnow()


def ev(seq: int, actor: str = "stored") -> TimelineEvent:
    return TimelineEvent(seq=seq, at=NOW, actor=actor, kind="k")


def test_events_still_in_the_outbox_fill_the_gaps_of_mongodb() -> None:
    stored = [ev(1), ev(2), ev(5), ev(6)]  # MongoDB's first limit + 1 after 0
    unstored = [ev(3, "outbox"), ev(4, "outbox"), ev(7, "hot")]
    page = page_of(stored, unstored, 0, 3)
    assert [e.seq for e in page.items] == [1, 2, 3]
    assert page.next_after_seq == 3


def test_the_last_page_says_nothing_is_left() -> None:
    page = page_of([ev(4), ev(5)], [ev(6, "hot")], 3, 5)
    assert [e.seq for e in page.items] == [4, 5, 6]
    assert page.next_after_seq is None


def test_a_not_yet_delivered_copy_wins_over_the_stored_one() -> None:
    page = page_of([ev(1)], [ev(1, "hot")], 0, 10)
    assert [e.actor for e in page.items] == ["hot"]


def test_events_at_or_before_the_cursor_are_left_out() -> None:
    page = page_of([ev(3), ev(4)], [ev(1, "hot"), ev(2, "hot")], 2, 10)
    assert [e.seq for e in page.items] == [3, 4]


def test_past_the_end_is_an_empty_last_page() -> None:
    page = page_of([], [ev(2, "hot")], 9, 10)
    assert page.items == []
    assert page.next_after_seq is None
